"""`radixserve executor` as a real process, driven over gRPC like the scheduler drives it."""

from __future__ import annotations

import math
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from radixserve.v1 import executor_pb2 as pb
from radixserve.v1 import executor_pb2_grpc as pb_grpc
from services.executor.sampling_params import SamplingParams
from services.executor.step import NewRequest, Slice, SlotWrite, StepInput, step_to_pb
from tests.executor.driver import Driver
from tests.executor.tiny import engine_for, hf_model
from tests.procs import ServiceProcess, free_port, scrape

GREEDY = SamplingParams(temperature=0, logprobs=True, top_logprobs=2)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100, 3, 3, 3]]


def greedy_reference(n: int) -> list[list[int]]:
    """The tiny model's n greedy tokens after each of PROMPTS, computed in this process."""
    return [j.output for j in Driver(engine_for(hf_model("llama"))).generate(PROMPTS, n)]


def add_both(slices: list[Slice]) -> StepInput:
    """Step 1: rows 0 and 1 join with PROMPTS (slots 1-19 and 40-59) and compute `slices`."""
    return StepInput(
        1,
        add=[NewRequest(r, f"r{r}", GREEDY, p) for r, p in enumerate(PROMPTS)],
        writes=[SlotWrite(0, 0, list(range(1, 20))), SlotWrite(1, 0, list(range(40, 60)))],
        slices=slices,
    )


class StepStream:
    """An open Run stream: send a Step, read its result."""

    def __init__(self, stub: pb_grpc.ExecutorStub) -> None:
        self.outbox: queue.Queue[pb.Step | None] = queue.Queue()
        self.results = stub.Run(self._requests(), timeout=120)

    def _requests(self) -> Iterator[pb.Step]:
        while (msg := self.outbox.get()) is not None:
            yield msg

    def __call__(self, step: StepInput) -> pb.StepResult:
        self.outbox.put(step_to_pb(step))
        return next(self.results)

    def close(self) -> None:
        self.outbox.put(None)


def run_all(stub: pb_grpc.ExecutorStub, steps: list[StepInput]) -> list[pb.StepResult]:
    """Sends every step at once on a new stream, once the previous stream has detached."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return list(stub.Run(iter([step_to_pb(s) for s in steps]), timeout=120))
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.FAILED_PRECONDITION or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


METRICS_PORT = free_port()  # the module's executor serves its /metrics here


@pytest.fixture(scope="module")
def executor(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    args = [
        "executor",
        "--metrics-port",
        str(METRICS_PORT),
        "--model-path",
        str(tiny_model_dir),
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-total-tokens",
        "2048",
        "--max-running-requests",
        "8",
        "--context-length",
        "256",
    ]
    log = tmp_path_factory.mktemp("logs") / "executor.log"
    with ServiceProcess(args, log) as proc:
        proc.wait_grpc_serving(port)
        yield f"127.0.0.1:{port}"
    assert proc.proc is not None and proc.proc.returncode == 0, proc.output()[-2000:]


def test_info_and_health(executor: str) -> None:
    with grpc.insecure_channel(executor) as channel:
        stub = pb_grpc.ExecutorStub(channel)
        info = stub.Info(pb.InfoRequest())
        assert (info.vocab_size, info.num_kv_slots, info.max_running_requests) == (256, 2048, 8)
        assert info.context_length == 256 and info.dtype == "float32" and info.device == "cpu"
        assert list(info.eos_token_ids) == [255] and info.attention_backend == "torch"
        assert info.kv_cache_dtype == "float32"
        assert stub.Health(pb.HealthRequest()).ready


def test_prefill_decode_and_a_rejected_step_over_the_wire(executor: str) -> None:
    prompts = PROMPTS
    reference = greedy_reference(6)
    metrics = f"http://127.0.0.1:{METRICS_PORT}/metrics"
    before = scrape(metrics)
    with grpc.insecure_channel(executor) as channel:
        stub = pb_grpc.ExecutorStub(channel)
        stub.Reset(pb.ResetRequest())
        run = StepStream(stub)
        first = run(add_both([Slice(0, 0, prompts[0][:3], sample=False), Slice(1, 0, prompts[1])]))
        assert not first.HasField("error")
        assert list(first.rows) == [1] and first.num_tokens == 7
        got = {0: [], 1: [first.token_ids[0]]}
        assert math.isfinite(first.logprobs[0]) and len(first.top_ids) == 2
        second = run(StepInput(2, slices=[Slice(0, 3, prompts[0][3:]), Slice(1, 4, [], True)]))
        for row, tok in zip(second.rows, second.token_ids, strict=True):
            got[row].append(tok)
        bad = run(StepInput(3, slices=[Slice(5, 0, [1])]))
        assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "row 5" in bad.error.message and len(bad.rows) == 0
        step_id = 4
        while len(got[0]) < 6 or len(got[1]) < 6:
            slices = [
                Slice(r, len(prompts[r]) + len(got[r]) - 1, [], True)
                for r in (0, 1)
                if len(got[r]) < 6
            ]
            res = run(StepInput(step_id, slices=slices))
            assert not res.HasField("error"), res.error.message
            for row, tok in zip(res.rows, res.token_ids, strict=True):
                got[row].append(tok)
            step_id += 1
        released = run(StepInput(step_id, release_rows=[0, 1]))
        assert not released.HasField("error")
        run.close()
        assert stub.Health(pb.HealthRequest()).active_rows == 0
    assert [got[0], got[1]] == reference
    after = scrape(metrics)  # every answered step is in the executor's own series

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert delta("radixserve:forward_time_seconds_count") == step_id - 1  # all but the rejected
    assert delta("radixserve:step_failures_total{kind=step}") == 1
    assert delta("radixserve:step_failures_total{kind=forward}") == 0
    run_rpc = "grpc_method=Run,grpc_service=radixserve.v1.Executor,grpc_type=bidi_stream"
    assert delta(f"grpc_server_started_total{{{run_rpc}}}") == 1


def test_end_decode_over_the_wire_ends_a_multi_iteration_step(executor: str) -> None:
    """EndDecode for a Step not yet sent: that Step of 4 iterations runs one and says so; the
    next runs all 4; the tokens are those of one decode per Step."""
    with grpc.insecure_channel(executor) as channel:
        stub = pb_grpc.ExecutorStub(channel)
        stub.Reset(pb.ResetRequest())
        run = StepStream(stub)
        first = run(add_both([Slice(0, 0, PROMPTS[0]), Slice(1, 0, PROMPTS[1])]))
        got = {row: [tok] for row, tok in zip(first.rows, first.token_ids, strict=True)}
        stub.EndDecode(pb.EndDecodeRequest(step_id=2))
        starts = [len(p) for p in PROMPTS]
        ended = run(
            StepInput(2, slices=[Slice(r, starts[r], [], True) for r in (0, 1)], decode_steps=4)
        )
        assert not ended.HasField("error"), ended.error.message
        assert ended.decode_iterations == 1 and list(ended.rows) == [0, 1]
        whole = run(
            StepInput(3, slices=[Slice(r, starts[r] + 1, [], True) for r in (0, 1)], decode_steps=4)
        )
        assert whole.decode_iterations == 4 and list(whole.rows) == [0, 1] * 4
        for res in (ended, whole):
            for row, tok in zip(res.rows, res.token_ids, strict=True):
                got[row].append(tok)
        assert not run(StepInput(4, release_rows=[0, 1])).HasField("error")
        run.close()
    assert [got[0], got[1]] == greedy_reference(6)


def test_a_second_concurrent_stream_is_refused(executor: str) -> None:
    with grpc.insecure_channel(executor) as channel:
        stub = pb_grpc.ExecutorStub(channel)
        first = StepStream(stub)
        assert not first(StepInput(1)).HasField("error")
        second = StepStream(stub)
        with pytest.raises(grpc.RpcError) as err:
            second(StepInput(1))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        second.close()
        first.close()


def test_unknown_model_path_exits_with_a_clear_error(tmp_path: Path) -> None:
    args = ["executor", "--model-path", str(tmp_path / "nope.gguf"), "--port", str(free_port())]
    with ServiceProcess(args, tmp_path / "bad.log") as proc:
        assert proc.proc is not None
        code = proc.proc.wait(60)
    assert code == 2
    assert "nope.gguf" in proc.output() and "Traceback" not in proc.output()


@pytest.mark.parametrize(
    ("flag", "kv_dtype"), [("bf16", torch.bfloat16), ("fp8_e5m2", torch.float8_e5m2)]
)
def test_narrow_kv_cache_flag(
    tiny_model_dir: Path, tmp_path: Path, flag: str, kv_dtype: torch.dtype
) -> None:
    """`--kv-cache-dtype bf16` or `fp8_e5m2` under a float32 model: Info reports the cache's dtype
    and its bytes per token, and the process generates what an in-process engine with a pool of
    that dtype does; under a float16 model the flag stops the process with a clear error."""
    port = free_port()
    args = ["executor", "--model-path", str(tiny_model_dir), "--port", str(port)]
    args += ["--metrics-port", "0", "--dtype", "float32", "--kv-cache-dtype", flag]
    args += ["--max-total-tokens", "1024", "--max-running-requests", "4", "--context-length", "64"]
    prompts = [[5, 6, 7, 8, 9, 10, 11], [100, 3, 3, 3]]
    engine = engine_for(hf_model("llama"), kv_dtype=kv_dtype)
    reference = [j.output for j in Driver(engine).generate(prompts, 6)]
    steps = [
        StepInput(
            1,
            add=[NewRequest(r, f"r{r}", GREEDY, p) for r, p in enumerate(prompts)],
            writes=[SlotWrite(0, 0, list(range(1, 20))), SlotWrite(1, 0, list(range(40, 60)))],
            slices=[Slice(r, 0, p) for r, p in enumerate(prompts)],
        )
    ]
    for i in range(1, 6):
        decode = [Slice(r, len(p) + i - 1, [], True) for r, p in enumerate(prompts)]
        steps.append(StepInput(1 + i, slices=decode))
    with ServiceProcess(args, tmp_path / "narrow.log") as proc:
        proc.wait_grpc_serving(port)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ExecutorStub(channel)
            info = stub.Info(pb.InfoRequest())
            results = run_all(stub, steps)
    assert (info.dtype, info.kv_cache_dtype) == ("float32", str(kv_dtype).removeprefix("torch."))
    # 2 layers x (K + V) x 2 KV heads x head dim 16 x 2 bytes (bfloat16) or 1 (float8)
    assert info.kv_bytes_per_token == 2 * 2 * 2 * 16 * kv_dtype.itemsize
    got: dict[int, list[int]] = {0: [], 1: []}
    for res in results:
        assert not res.HasField("error"), res.error.message
        for row, tok in zip(res.rows, res.token_ids, strict=True):
            got[row].append(tok)
    assert [got[0], got[1]] == reference

    args[args.index("float32")] = "float16"
    with ServiceProcess(args, tmp_path / "f16.log") as proc:
        assert proc.proc is not None
        code = proc.proc.wait(60)
    assert code == 2 and "Traceback" not in proc.output()
    assert f"--kv-cache-dtype {flag} needs a float32 or bfloat16 model (--dtype is float16)" in (
        proc.output()
    )


def test_steps_sent_ahead_run_in_order_and_a_rejected_one_changes_nothing(executor: str) -> None:
    """The whole stream is sent before any result is read, so the executor prepares later steps
    while earlier ones compute; decode steps use the token the previous step sampled."""
    prompts = [[5, 6, 7, 8, 9, 10, 11], [100, 3, 3, 3]]
    reference = [j.output for j in Driver(engine_for(hf_model("llama"))).generate(prompts, 6)]
    steps = [
        StepInput(
            1,
            add=[NewRequest(r, f"r{r}", GREEDY, p) for r, p in enumerate(prompts)],
            writes=[SlotWrite(0, 0, list(range(1, 20))), SlotWrite(1, 0, list(range(40, 60)))],
            slices=[Slice(r, 0, p) for r, p in enumerate(prompts)],
        ),
        StepInput(2, add=[NewRequest(0, "again", GREEDY)], slices=[Slice(0, 0, [1])]),
    ]
    for i in range(1, 6):
        decode = [Slice(r, len(p) + i - 1, [], True) for r, p in enumerate(prompts)]
        steps.append(StepInput(2 + i, slices=decode))
    steps.append(StepInput(8, release_rows=[0, 1]))
    with grpc.insecure_channel(executor) as channel:
        results = run_all(pb_grpc.ExecutorStub(channel), steps)
    assert [r.step_id for r in results] == [s.step_id for s in steps]
    assert results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    got: dict[int, list[int]] = {0: [], 1: []}
    for res in results[:1] + results[2:]:
        assert not res.HasField("error"), res.error.message
        for row, tok in zip(res.rows, res.token_ids, strict=True):
            got[row].append(tok)
    assert [got[0], got[1]] == reference
