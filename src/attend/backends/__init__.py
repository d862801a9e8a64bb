"""Every backend module, imported so its default instance is registered. Nothing else lives here."""

from .base import Backend, Caps
from .chunked import ChunkedBackend
from .einsum import EinsumBackend
from .sdpa import SdpaCudnn, SdpaEfficient, SdpaFlash, SdpaMath

__all__ = ["Backend", "Caps", "REGISTERED"]

# one default instance per stable name, in the order `list_backends()` shows them
REGISTERED: tuple[Backend, ...] = (
    EinsumBackend(),
    SdpaFlash(),
    SdpaEfficient(),
    SdpaCudnn(),
    SdpaMath(),
    ChunkedBackend(),
)
