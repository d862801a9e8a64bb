"""The interleaved timer (`attend.bench.timer`), on a fake clock: what it measures does not depend on a
candidate's burst length or on where it stands in the list."""

from __future__ import annotations

import pytest
import torch

from attend.bench import timer


class _Machine:
    """A fake clock and candidates whose call costs `warm` time units, plus `cold` more when another candidate ran
    just before (its data left the caches); the first `noisy_calls` calls of a candidate cost three times as much."""

    def __init__(self, monkeypatch):
        self.now = 0.0
        self.last: str | None = None
        self.calls: dict[str, int] = {}
        monkeypatch.setattr(timer.time, "perf_counter", lambda: self.now)

    def candidate(self, name: str, warm: float, cold: float, noisy_calls: int = 0):
        def run():
            n = self.calls[name] = self.calls.get(name, 0) + 1
            cost = warm + (cold if self.last != name else 0.0)
            self.now += cost * (3 if n <= noisy_calls else 1)
            self.last = name

        return run


@pytest.mark.parametrize("first", ["a", "b"])
def test_quick_candidates_are_timed_alike_whatever_their_bursts(monkeypatch, first):
    """Two candidates with the same cost, one of them slow at its first calls (which size its bursts), and a slow
    third: every sample of both quick ones is the warm cost, in either order. (Before, a burst's first call was
    timed: about 40 % of the quick candidates' samples paid the cold start here, a share that depended on the
    burst length, so on noise in the calls that sized it.)"""
    m = _Machine(monkeypatch)
    fns = {
        "a": m.candidate("a", 1e-4, 2e-4, noisy_calls=2),
        "b": m.candidate("b", 1e-4, 2e-4),
        "slow": m.candidate("slow", 1e-3, 2e-4),
    }
    if first == "b":
        fns = {k: fns[k] for k in ("b", "a", "slow")}
    got = timer.time_interleaved(fns, torch.device("cpu"), min_time=0.05, max_runs=300)
    for name in ("a", "b"):  # every sample warm: each burst starts with an untimed call
        assert min(got[name].samples) == pytest.approx(1e-4) and max(got[name].samples) == pytest.approx(1e-4)
    assert got["slow"].median == pytest.approx(1.2e-3)  # one call a round: it pays the cold start
    assert len(got["a"].samples) >= 100 and len(got["b"].samples) >= 100


@pytest.mark.parametrize("costs", [(0.8, 0.17, 0.17, 0.2), (1.0, 0.01, 0.3), (2.5, 0.17, 0.17), (0.05, 0.05)])
def test_the_estimate_is_what_the_timer_spends(monkeypatch, costs):
    """`cost.timer_seconds` (the estimate `attend bench` prints first) and `time_interleaved` on a fake clock agree,
    bursts included: one burst rule (`timer.burst_calls`) for both."""
    from attend.bench import cost

    m = _Machine(monkeypatch)
    fns = {f"c{n}": m.candidate(f"c{n}", t, 0.0) for n, t in enumerate(costs)}
    timer.time_interleaved(fns, torch.device("cpu"), min_time=0.3)
    assert m.now == pytest.approx(cost.timer_seconds(list(costs), 0.3), rel=0.05)


def test_a_very_slow_candidate_is_timed_once_after_its_warm_up(monkeypatch):
    """A call of 4 * min_time or more (the seed's einsum at 4k on a slow VM: 2.5 s) gets one timed sample; one of
    2 * min_time, two; the quick ones still their minimum."""
    m = _Machine(monkeypatch)
    fns = {"slowest": m.candidate("slowest", 1.3, 0.0), "slow": m.candidate("slow", 0.7, 0.0),
           "quick": m.candidate("quick", 0.01, 0.0)}  # fmt: skip
    got = timer.time_interleaved(fns, torch.device("cpu"), min_time=0.3)
    assert len(got["slowest"].samples) == 1 and m.calls["slowest"] == 2  # warm-up and one sample
    assert len(got["slow"].samples) == 2
    assert len(got["quick"].samples) >= 3
