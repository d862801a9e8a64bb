"""attend: the attention core for PyTorch models.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.

    from attend import Attend, attention, explain, list_backends
    from attend import scaled_dot_product_attention   # drop-in for F.scaled_dot_product_attention
    from attend import varlen_attn                    # torch.nn.attention.varlen.varlen_attn, every device
    from attend import with_kvcache                   # KV-cache decoding, in-place append, paged caches
"""

from .backends.base import Backend, Caps
from .compat import scaled_dot_product_attention
from .dispatch import AttendFallbackWarning, NoBackendError, Report, get_backend, list_backends, register_backend
from .functional import attention, explain
from .inputs import AttnInputs
from .kvcache import explain_kvcache, with_kvcache
from .module import Attend
from .varlen import varlen_attn

__version__ = "0.1.0"

__all__ = [
    "Attend",
    "attention",
    "scaled_dot_product_attention",
    "varlen_attn",
    "with_kvcache",
    "explain_kvcache",
    "explain",
    "list_backends",
    "get_backend",
    "register_backend",
    "NoBackendError",
    "AttendFallbackWarning",
    "Report",
    "AttnInputs",
    "Backend",
    "Caps",
    "__version__",
]
