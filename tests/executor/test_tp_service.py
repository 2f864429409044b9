"""`radixserve executor --tp N` as a real process: the same tokens and logprobs as one rank over
gRPC, more KV slots from the same memory, and a rank that dies takes the executor down."""

from __future__ import annotations

import contextlib
import random
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
import torch

from radixserve.v1 import executor_pb2 as pb
from radixserve.v1 import executor_pb2_grpc as pb_grpc
from services.executor.engine import Engine, EngineLimits
from services.executor.model_config import ModelConfig
from services.executor.ranks import RANK_EXIT_CODE
from services.executor.sampling_params import SamplingParams
from services.executor.step import NewRequest, Slice, SlotWrite, StepInput, StepOutput
from services.executor.weights import load_model
from tests.executor.test_service import StepStream, run_all
from tests.procs import ServiceProcess, free_port

pytestmark = pytest.mark.slow
TOLERANCE = 1e-4
ROWS, NEW_TOKENS, CONTEXT = 16, 4, 64


def executor_args(model: Path, port: int, tp: int, *extra: str) -> list[str]:
    return [
        "executor",
        "--model-path",
        str(model),
        "--port",
        str(port),
        "--tp",
        str(tp),
        "--dtype",
        "float32",
        "--num-threads",
        "1",
        "--max-total-tokens",
        "1024",
        "--max-running-requests",
        str(ROWS),
        "--context-length",
        str(CONTEXT),
        *extra,
    ]


def follower_pids(log: str) -> list[int]:
    match = re.search(r"started tensor-parallel ranks 1\.\.\d+ \(pids \[([\d, ]+)\]\)", log)
    assert match, log[-2000:]
    return [int(p) for p in match.group(1).split(",")]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(gone(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def reference_engine(path: Path, max_top_logprobs: int) -> Engine:
    """One rank, in this process, with the executor's settings."""
    cfg, cpu = ModelConfig.from_dir(path), torch.device("cpu")
    model = load_model(path, cfg, CONTEXT, torch.float32, cpu)
    return Engine(model, cfg, EngineLimits(1024, ROWS, CONTEXT, max_top_logprobs), cpu)


def generation_steps(vocab: int, params: SamplingParams, seed: int = 0) -> list[StepInput]:
    """ROWS prompts prefilled together, then NEW_TOKENS - 1 decode steps from the sampled tokens."""
    rnd = random.Random(seed)
    prompts = [[rnd.randrange(vocab) for _ in range(rnd.randrange(2, 12))] for _ in range(ROWS)]
    steps = [
        StepInput(
            1,
            add=[NewRequest(r, f"r{r}", params, p) for r, p in enumerate(prompts)],
            writes=[
                SlotWrite(r, 0, list(range(1 + CONTEXT * r, 1 + CONTEXT * (r + 1) - 1)))
                for r in range(ROWS)
            ],
            slices=[Slice(r, 0, p) for r, p in enumerate(prompts)],
        )
    ]
    for k in range(1, NEW_TOKENS):
        slices = [
            Slice(r, len(p) + k - 1, [], use_last_sampled=True) for r, p in enumerate(prompts)
        ]
        steps.append(StepInput(1 + k, slices=slices))
    steps.append(StepInput(NEW_TOKENS + 1, release_rows=list(range(ROWS))))
    return steps


def assert_same_results(results: list[pb.StepResult], expected: list[StepOutput]) -> None:
    """Same tokens; the logprobs of each token and of its alternatives within TOLERANCE."""
    assert len(results) == len(expected)
    for res, ref in zip(results, expected, strict=True):
        assert not res.HasField("error"), res.error.message
        assert list(res.token_ids) == [t.token_id for t in ref.tokens], res.step_id
        n = len(ref.tokens[0].top_ids) if ref.tokens else 0
        for i, t in enumerate(ref.tokens):
            assert abs(res.logprobs[i] - t.logprob) < TOLERANCE
            ours = dict(
                zip(
                    res.top_ids[i * n : (i + 1) * n],
                    res.top_logprobs[i * n : (i + 1) * n],
                    strict=True,
                )
            )
            for tok, logprob in zip(t.top_ids, t.top_logprobs, strict=True):
                # a near tie may order two alternatives differently, or swap the last one out
                if tok in ours:
                    assert abs(ours[tok] - logprob) < TOLERANCE, (res.step_id, i, tok)
            assert len(set(ours) & set(t.top_ids)) >= n - 1


@contextlib.contextmanager
def serving(args: list[str], log: Path) -> Iterator[tuple[str, ServiceProcess]]:
    port = int(args[args.index("--port") + 1])
    with ServiceProcess(args, log) as proc:
        proc.wait_grpc_serving(port, timeout=300)
        yield f"127.0.0.1:{port}", proc


def test_two_ranks_match_one_over_grpc(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Tiny Llama (4 query heads, 2 KV heads, vocabulary 256) on 2 ranks: every logprob of the
    vocabulary, i.e. the logits up to their log-sum-exp, within 1e-4, and the same greedy tokens."""
    params = SamplingParams(temperature=0, logprobs=True, top_logprobs=256)
    steps = generation_steps(256, params)
    reference = reference_engine(tiny_model_dir, 256)
    expected = [reference.run_step(s) for s in steps]
    args = executor_args(tiny_model_dir, free_port(), 2, "--max-top-logprobs", "256")
    with serving(args, tmp_path / "executor.log") as (address, proc):
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.ExecutorStub(channel)
            info = stub.Info(pb.InfoRequest())
            assert (info.tp_size, info.num_kv_slots) == (2, 1024)
            # 2 layers x (K + V) x 2 KV heads (one per rank) x head dim 16 x 4 bytes
            assert info.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
            results = run_all(stub, steps)
        pids = follower_pids(proc.output())
    assert_same_results(results, expected)
    assert proc.proc is not None and proc.proc.returncode == 0, proc.output()[-3000:]
    assert wait_gone(pids, 10), "a follower rank outlived rank 0"


def test_smollm2_on_three_ranks_matches_one_over_grpc(
    default_model_dir: Path, tmp_path: Path
) -> None:
    """SmolLM2-135M (9 query heads, 3 KV heads: one per rank) in float32: the same greedy
    tokens, and the logprobs of each token and of its top 20 alternatives within 1e-4."""
    params = SamplingParams(temperature=0, logprobs=True, top_logprobs=20)
    steps = generation_steps(ModelConfig.from_dir(default_model_dir).vocab_size, params, seed=1)
    reference = reference_engine(default_model_dir, 20)
    expected = [reference.run_step(s) for s in steps]
    del reference
    args = executor_args(default_model_dir, free_port(), 3)
    log = tmp_path / "executor.log"
    with serving(args, log) as (address, _), grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ExecutorStub(channel)
        assert stub.Info(pb.InfoRequest()).tp_size == 3
        results = run_all(stub, steps)
    assert_same_results(results, expected)


def test_a_killed_follower_stops_the_executor(tiny_model_dir: Path, tmp_path: Path) -> None:
    args, log = executor_args(tiny_model_dir, free_port(), 2), tmp_path / "executor.log"
    with serving(args, log) as (address, proc), grpc.insecure_channel(address) as channel:
        stream = StepStream(pb_grpc.ExecutorStub(channel))  # a scheduler attached, idle
        assert not stream(StepInput(1)).HasField("error")
        (follower,) = follower_pids(proc.output())
        psutil.Process(follower).send_signal(signal.SIGKILL)
        started = time.monotonic()
        assert proc.proc is not None
        code = proc.proc.wait(timeout=30)
        elapsed = time.monotonic() - started
        stream.close()
    assert code == RANK_EXIT_CODE and elapsed < 10, (code, elapsed)
    assert f"tensor-parallel rank 1 (pid {follower}) exited with code -9" in proc.output()


def test_followers_exit_when_rank_0_is_killed(tiny_model_dir: Path, tmp_path: Path) -> None:
    args = executor_args(tiny_model_dir, free_port(), 2)
    with serving(args, tmp_path / "executor.log") as (_, proc):
        pids = follower_pids(proc.output())
        assert proc.proc is not None
        proc.proc.kill()
        proc.proc.wait(10)
        assert wait_gone(pids, 10), "a follower rank outlived rank 0"
