"""`Attend`: the drop-in for gigagan-pytorch's `Attend(dropout=0., flash=False)`.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from ._helpers import any_autocast, autocast_inputs, default, exists
from .dispatch import NoBackendError, Report, call, explain_inputs
from .functional import DOC_SEMANTICS
from .inputs import Options, check_options, check_window, validate

__all__ = ["Attend"]

log = logging.getLogger("attend")
# the attributes `Attend._options` reads: setting one drops the cached options of a plain call
_OPTION_ATTRS = frozenset(
    {"causal", "scale", "dropout", "window", "score", "deterministic", "check_finite", "softcap", "training"}
)


class Attend(nn.Module):
    def __init__(
        self,
        dropout: float = 0.0,
        flash: bool | None = None,
        *,
        causal: bool = False,
        scale: float | None = None,
        backend: str | None = None,
        window: tuple[int | None, int | None] | None = None,
        score: str = "dot",
        deterministic: bool = False,
        check_finite: bool | None = None,
        softcap: float | None = None,
    ):
        super().__init__()
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"expected `dropout` in [0, 1), got {dropout!r}")
        if flash is not None and not isinstance(flash, bool):
            raise TypeError(f"expected `flash` to be True, False or None, got {flash!r}")
        # one rule both ways: a named backend must agree with `flash` (False = the einsum reference, True = a
        # fused kernel); to name any backend, leave `flash` at None
        if flash is False and exists(backend) and backend != "einsum":
            raise ValueError(
                f"expected either flash=False (the einsum backend) or backend=..., got flash=False and "
                f"backend={backend!r}; hint: drop `flash` when you name a backend"
            )
        if flash is True and backend is not None:
            from .dispatch import get_backend

            if not get_backend(backend).fused:
                raise ValueError(
                    f"expected a fused backend with flash=True, got backend={backend!r} (not a fused kernel); "
                    "hint: drop `flash` when you name a backend"
                )
        if not isinstance(deterministic, bool):
            raise TypeError(f"expected `deterministic` to be True or False, got {deterministic!r}")
        if check_finite is not None and not isinstance(check_finite, bool):
            raise TypeError(f"expected `check_finite` to be True, False or None, got {check_finite!r}")
        if backend is not None:
            from .dispatch import get_backend

            get_backend(backend)  # unknown names fail here, at construction

        check_window(window, False)  # a bad window, score or softcap fails here, at construction
        check_options(Options(softcap=softcap), 1)
        if score not in ("dot", "l2"):
            raise ValueError(f"expected `score` to be 'dot' or 'l2', got {score!r}")
        self.dropout = float(dropout)
        self.flash = flash
        self.causal = causal
        self.scale = scale
        self.backend = "einsum" if flash is False else backend
        self.window = None if window is None else tuple(window)
        self.score = score
        self.deterministic = deterministic
        self.check_finite = check_finite
        self.softcap = softcap

    def extra_repr(self) -> str:
        extra = "" if self.window is None else f", window={self.window}"
        extra += "" if self.score == "dot" else f", score={self.score!r}"
        return (
            f"dropout={self.dropout}, flash={self.flash}, causal={self.causal}, scale={self.scale}, "
            f"backend={self.backend!r}{extra}, deterministic={self.deterministic}, check_finite={self.check_finite}"
            + ("" if self.softcap is None else f", softcap={self.softcap}")
        )

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in _OPTION_ATTRS:  # `train()` / `eval()` set `training` here too
            self.__dict__["_default_options"] = None

    def _options(self, causal: bool | None, window: tuple[int | None, int | None] | None = None) -> Options:
        if causal is None and window is None and not torch.compiler.is_compiling():
            # the options of a call that overrides nothing: built once, until an attribute they read changes
            # (not while torch.compile traces: a guard on the cached value would recompile once it is set)
            cached = self.__dict__.get("_default_options")
            if cached is None:
                cached = self.__dict__["_default_options"] = self._build_options(None, None)
            return cached
        return self._build_options(causal, window)

    def _build_options(self, causal: bool | None, window: tuple[int | None, int | None] | None) -> Options:
        return Options(
            causal=default(causal, self.causal),
            scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0,
            window=default(window, self.window),
            score=self.score,
            deterministic=self.deterministic,
            check_finite=self.check_finite,
            softcap=self.softcap,
        )

    def _inputs(self, q, k, v, mask, bias, causal, documents=None, window=None):
        q, k, v, bias = autocast_inputs(q, k, v, bias)  # under autocast: one dtype, the autocast one
        options = self._options(causal, window)
        return validate(q, k, v, mask=mask, bias=bias, documents=documents, options=options)

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None = None,
        bias: Tensor | None = None,
        causal: bool | None = None,
        documents: Tensor | tuple[Tensor, Tensor] | None = None,
        window: tuple[int | None, int | None] | None = None,
        sinks: Tensor | None = None,
        return_lse: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        if any_autocast():
            q, k, v, bias = autocast_inputs(q, k, v, bias)  # type: ignore[assignment]
        options = self._options(causal, window)
        if return_lse:
            options = options._replace(return_lse=return_lse)
        if self.flash is True and self.backend is None:
            try:
                return call(q, k, v, mask, bias, documents, sinks, options=options, fused_only=True)
            except NoBackendError:
                # the seed fell back to SDPA's math kernel here; keep that, but say so (once)
                hint = self._inputs(q, k, v, mask, bias, causal, documents, window).cli_hint()
                _log_once(f"Attend(flash=True): no fused kernel can run {hint!r}; using auto")
        return call(q, k, v, mask, bias, documents, sinks, options=options, backend=self.backend)

    def explain(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None = None,
        bias: Tensor | None = None,
        causal: bool | None = None,
        documents: Tensor | tuple[Tensor, Tensor] | None = None,
        window: tuple[int | None, int | None] | None = None,
    ) -> Report:
        """The `Report` for what `forward` would run on these inputs (in the module's current mode)."""
        inp = self._inputs(q, k, v, mask, bias, causal, documents, window)
        fused_only = self.flash is True and self.backend is None
        report = explain_inputs(inp, self.backend, fused_only=fused_only)
        if fused_only and report.backend is None:
            # forward falls back to auto here (see the class docstring): report what it will run, with auto's own
            # reasons (the fused-only report would call the backend it picks "not a fused kernel")
            report = explain_inputs(inp)
        return report


Attend.__doc__ = (
    """Attention as an `nn.Module`: gigagan-pytorch's `Attend(dropout, flash)` call shape, with one mask
    vocabulary on every backend and a dispatcher that explains itself.

    Args:
        dropout: dropout on the attention probabilities, applied only in training mode.
        flash: the seed's switch. False runs the `einsum` reference; True runs auto among the fused
            kernels (falling back to auto, logged once, when none can run the inputs, as the seed fell
            back to SDPA's math kernel); None (default) is auto among all backends. With `backend`, flash
            must agree or stay None: False only with "einsum", True only with a fused kernel.
        causal: default for `forward(causal=None)`; bottom-right aligned.
        window: (left, right) local attention, as in `attention` (with causal, right is 0).
        score: "dot" or "l2" (GigaGAN's negative squared L2 distance), as in `attention`.
        scale: logit scale, default d ** -0.5.
        backend: pin a backend by name (`attend.list_backends()`); it runs or raises ValueError.
        deterministic: only backends declared deterministic may run this module, so two runs give
            bitwise-identical outputs and gradients (what `torch.use_deterministic_algorithms(True)`
            does for every module); `explain` names the backends it excludes.
        check_finite: the NaN/inf check, as in `attention`. None (default): on CPU a call that masks
            anything reads its output (nothing a row may not see reaches it), off on CUDA (no host sync per
            call); True: exact everywhere (q, k, v read: NaN exactly in the rows that see one); False: off.
        softcap: logit soft-capping (Gemma 2), as in `attention`.

    forward(q, k, v, mask=None, bias=None, causal=None, documents=None, window=None, sinks=None,
            return_lse=False) -> out, or (out, lse)
        documents: int (b, j) document ids, or a pair ((b, i), (b, j)), as in `attention`.
        window: this call's (left, right), overriding the module's (None: the module's).
        sinks: attention sinks (h,) or (b, h), as in `attention` (gpt-oss keeps them as a learned parameter).
        return_lse: return `(out, lse)`, lse (b, h, i) the log-sum-exp, as in `attention`.
"""
    + DOC_SEMANTICS
    + """
    Raises:
        TypeError, ValueError: bad input ("expected X, got Y"), or a pinned backend that cannot run.
        NoBackendError: nothing registered can run the inputs.

    Example (the gigagan drop-in)::

        >>> attn = Attend(dropout=0.1, flash=True)
        >>> q = k = v = torch.randn(2, 8, 1024, 64)
        >>> out = attn(q, k, v)                          # (2, 8, 1024, 64)
        >>> out = attn(q, k, v, mask=torch.ones(2, 1024, dtype=torch.bool), causal=True)
        >>> print(attn.explain(q, k, v))                 # which kernel runs, and why not the others
    """
)

_logged: set[str] = set()


def _log_once(msg: str) -> None:
    if torch.compiler.is_compiling():
        # a logging call is a graph break under torch.compile (fullgraph=True fails); eager calls still log
        return
    if msg not in _logged:
        _logged.add(msg)
        log.info(msg)
