"""Long computations run a unit at a time (cosyserve.work_units): pause points, budgets, cancel, errors."""

from __future__ import annotations

import time

import pytest
import torch

from cosyserve.work_units import UnitJob, job_clock, unit_boundary


def _three_units(log: list[str]) -> int:
    for i in range(3):
        log.append(f"unit {i}")
        unit_boundary()
    return 42


def test_a_job_runs_one_unit_per_advance_and_returns_its_result():
    log: list[str] = []
    job = UnitJob(lambda: _three_units(log))
    assert log == [] and not job.done  # nothing runs before the first advance
    assert job.advance() is False and log == ["unit 0"]
    log.append("the caller")
    assert job.advance() is False and log[-1] == "unit 1"
    assert not job.advance() and job.advance()  # the last unit ends the job
    assert job.done and job.result == 42 and job.error is None and job.units == 4
    assert job.advance()  # over: nothing more runs
    assert log == ["unit 0", "the caller", "unit 1", "unit 2"]


def test_outside_a_job_a_boundary_does_nothing():
    assert _three_units([]) == 42


def test_run_for_stops_after_its_budget_but_never_cuts_a_unit():
    def slow_units() -> str:
        for _ in range(5):
            time.sleep(0.02)
            unit_boundary()
        return "done"

    job = UnitJob(slow_units)
    assert job.run_for(0.03) is False  # two units of 0.02 s pass 0.03 s
    assert job.units == 2
    assert job.run_for(None) and job.result == "done"


def test_an_error_is_kept_for_the_caller_and_a_cancel_runs_finally_blocks():
    def failing() -> None:
        unit_boundary()
        raise ValueError("broken")

    job = UnitJob(failing)
    job.run_for(None)
    assert job.done and isinstance(job.error, ValueError)

    cleaned: list[str] = []

    def holding() -> None:
        try:
            while True:
                unit_boundary()
        finally:
            cleaned.append("freed")

    job = UnitJob(holding)
    job.advance()
    job.cancel()
    assert job.done and cleaned == ["freed"] and job.error is None
    UnitJob(holding).cancel()  # never started: nothing to unwind


def test_job_clock_counts_a_jobs_own_time_only():
    seen: list[float] = []

    def timed() -> None:
        start = job_clock()
        unit_boundary()
        seen.append(job_clock() - start)

    job = UnitJob(timed)
    job.advance()
    time.sleep(0.2)  # paused: not the job's time
    job.advance()
    assert seen[0] < 0.1


def test_torch_state_of_the_caller_holds_inside_a_job():
    def inside() -> tuple[bool, bool]:
        unit_boundary()
        return torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    with torch.inference_mode():
        job = UnitJob(inside)
        job.run_for(None)
    assert job.result == (True, False)
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("units", [1, 7])
def test_jobs_interleave_with_their_own_state(units):
    def count(name: str, log: list[str]) -> str:
        for i in range(units):
            log.append(f"{name}{i}")
            unit_boundary()
        return name

    log: list[str] = []
    a, b = UnitJob(lambda: count("a", log)), UnitJob(lambda: count("b", log))
    while not (a.done and b.done):
        a.advance()
        b.advance()
    assert (a.result, b.result) == ("a", "b")
    assert log[:4] == (["a0", "b0", "a1", "b1"] if units > 1 else ["a0", "b0"])
