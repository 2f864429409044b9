"""The executor's series from its step results."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from radixserve.v1 import executor_pb2 as pb
from services.executor.metrics import ExecutorMetrics


def failures(registry: CollectorRegistry, kind: str) -> float | None:
    return registry.get_sample_value(
        "radixserve:step_failures_total", {"model_name": "m", "kind": kind}
    )


def test_step_results_are_timed_and_failures_counted_by_kind() -> None:
    registry = CollectorRegistry()
    metrics = ExecutorMetrics(registry)
    metrics.step(pb.StepResult(step_id=1, forward_ns=5_000_000))  # before the model: not counted
    metrics.bind("m")
    assert [failures(registry, k) for k in ("step", "forward", "sample")] == [0, 0, 0]
    metrics.step(pb.StepResult(step_id=2, forward_ns=20_000_000))
    metrics.step(
        pb.StepResult(
            step_id=3,
            forward_ns=10_000_000,
            rows=[5, 1, 2],
            token_ids=[7, 0, 0],
            unwritten_rows=[1, 2],
            failed=[0, 1, 2],
            failed_reasons=["x", "y", "z"],
        )
    )
    metrics.step(pb.StepResult(step_id=4, error=pb.StepError(code=3, message="bad row")))
    forward = {"model_name": "m"}
    assert registry.get_sample_value("radixserve:forward_time_seconds_count", forward) == 2
    assert (
        abs(registry.get_sample_value("radixserve:forward_time_seconds_sum", forward) - 0.03) < 1e-9
    )
    assert [failures(registry, k) for k in ("step", "forward", "sample")] == [1, 2, 1]
    # Two decode iterations: each failed row has an entry per iteration, counted once.
    metrics.step(
        pb.StepResult(
            step_id=5,
            rows=[5, 1, 5, 1],
            token_ids=[0, 0, 0, 0],
            unwritten_rows=[1],
            failed=[0, 1, 2, 3],
            failed_reasons=["x", "y", "x", "y"],
        )
    )
    assert [failures(registry, k) for k in ("step", "forward", "sample")] == [1, 3, 2]
