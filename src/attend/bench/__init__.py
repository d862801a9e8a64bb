"""Benchmarks behind `attend bench`: suites as data (`cases`), FLOP counting (`flops`), an interleaved
median timer (`timer`), peak memory (`memory`, its child process `memory_child`), the candidates
(`impls`), the harness every suite runs in (`harness`: the configuration, the result document, the
helpers the suites share), the attention suites' runner (`run`), the structured suites' candidates and
runner (`structured`: formulations of the same attention side by side, with floors), the decode suites'
(`decode`: one decoding step against a KV cache, as GB/s and a share of a copy's bandwidth) and the
reports (`report`: rich table, JSON, markdown, PNG plot, comparison).

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.
"""

from .cases import SUITES, BenchCase
from .flops import attention_flops
from .harness import BenchConfig
from .run import run_suite

__all__ = ["SUITES", "BenchCase", "BenchConfig", "attention_flops", "run_suite"]
