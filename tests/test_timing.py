"""featkd.bench.timing: interleaved rounds keep every round's sample, paired ratios are taken round by round."""

from __future__ import annotations

import itertools

import pytest

from featkd.bench.timing import paired_ratios, time_interleaved


def test_samples_are_the_rounds_and_paired_ratios_pair_them() -> None:
    ticks = itertools.count()
    clock = lambda: float(next(ticks))  # noqa: E731  every clock read advances one "second"
    calls = {"a": 0, "b": 0}

    def fn(name: str):
        return lambda: calls.__setitem__(name, calls[name] + 1)

    times = time_interleaved({"a": fn("a"), "b": fn("b")}, rounds=3, calls=2, warmup=1, clock=clock)
    assert calls == {"a": 1 + 3 * 2, "b": 1 + 3 * 2}
    for t in times.values():  # each round: one read before and one after its 2 calls -> 1 / 2 s per call
        assert t["samples"] == [0.5, 0.5, 0.5] and t["median"] == t["min"] == 0.5 and t["rounds"] == 3
    per_round = paired_ratios({"a": {"samples": [2.0, 3.0, 9.0, 4.0]}, "b": {"samples": [1.0, 1.0, 3.0, 1.0]}},
                              "a", "b")
    assert per_round == {"median": 3.0, "min": 2.0, "q1": pytest.approx(2.75), "q3": pytest.approx(3.25),
                         "max": 4.0, "rounds": 4}
