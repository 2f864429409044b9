"""The executor's Prometheus series (served at its --metrics-port; docs/metrics.md): how long each
step's forward pass took, and the steps and rows that failed. One observation per step result."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from radixserve.v1 import executor_pb2 as pb
from services.common.metrics import MODEL_NAME, PREFIX

# Seconds: a decode step of a small model takes milliseconds, a long prefill seconds.
FORWARD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)  # fmt: skip


class ExecutorMetrics:
    """Series of one executor; `bind` names the model once it is loaded (no samples before)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._forward = Histogram(
            PREFIX + "forward_time_seconds",
            "Time one step's forward pass and sampling took",
            [MODEL_NAME],
            registry=registry,
            buckets=FORWARD_BUCKETS,
        )
        self._failures = Counter(
            PREFIX + "step_failures",
            "Step results with a failure, by kind: step (the whole step answered with an error), "
            "forward (a slice whose forward failed, KV not written), sample (a failed sampling)",
            [MODEL_NAME, "kind"],
            registry=registry,
        )
        self.model_name: str | None = None

    def bind(self, model_name: str) -> None:
        self.model_name = model_name
        for kind in ("step", "forward", "sample"):  # every series exists from the start, at 0
            self._failures.labels(model_name, kind)

    def step(self, result: pb.StepResult) -> None:
        """Records one answered step."""
        if self.model_name is None:
            return
        if result.HasField("error"):
            self._failures.labels(self.model_name, "step").inc()
            return
        self._forward.labels(self.model_name).observe(result.forward_ns / 1e9)
        if result.unwritten_rows:
            self._failures.labels(self.model_name, "forward").inc(len(result.unwritten_rows))
        # Rows, not entries: a failed row has an entry per decode iteration, and a row whose
        # forward failed is listed in `failed` too.
        sampling = {result.rows[i] for i in result.failed} - set(result.unwritten_rows)
        if sampling:
            self._failures.labels(self.model_name, "sample").inc(len(sampling))
