"""The prefill side's pacing of progress reports (sched/progress.py), stepped by hand."""

from __future__ import annotations

from pdserve.sched.progress import ProgressPacer, progress_interval


def test_interval_is_well_inside_both_timeouts() -> None:
    assert progress_interval(30.0, 60.0) == 7.5
    assert progress_interval(30.0, 2.0) == 0.5


def test_each_held_request_is_reported_once_per_interval_until_its_first_token() -> None:
    p = ProgressPacer(every_s=1.0)
    p.arrived("a", 0.0)
    p.arrived("b", 0.5)
    assert p.due(0.9) == []  # a short prompt: its first token comes before any report
    assert p.due(1.0) == ["a"]
    assert p.due(1.4) == []  # "a" was just reported
    assert p.due(1.5) == ["b"]
    assert sorted(p.due(2.6)) == ["a", "b"]  # steps far apart (a long chunk): both at once
    p.forget("a")  # its first token went out
    assert p.due(5.0) == ["b"]
    p.forget("b")
    p.forget("b")  # ended twice (first token, then forgotten): fine
    assert p.due(10.0) == [] and len(p) == 0
