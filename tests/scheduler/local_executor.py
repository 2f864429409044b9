"""An in-process executor: a real Engine behind the Step protobufs.

The scheduler talks to `LocalExecutor` exactly as to the gRPC client: Steps go out as protobufs,
results come back as protobufs, one at a time and in order, computed on a worker thread so the
overlap loop really overlaps. Every Step is recorded for the tests to inspect.
"""

from __future__ import annotations

import asyncio
import random
import threading
from concurrent.futures import ThreadPoolExecutor

from radixserve.v1 import executor_pb2 as pb
from radixserve.v1 import grammar_pb2 as gpb
from services.common.grammar import GrammarError, GrammarSpec
from services.executor.engine import Engine
from services.executor.step import error_to_pb, output_to_pb, step_from_pb
from services.executor.validation import StepRejected
from services.scheduler.errors import InvalidRequest
from services.scheduler.executor_client import ExecutorInfo
from tests.executor.tiny import engine_for

EOS = 255


class LocalExecutor:
    """ExecutorLink over an in-process Engine; `steps` records every Step sent."""

    def __init__(self, engine: Engine, eos: int = EOS) -> None:
        self.engine, self.eos = engine, eos
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-executor")
        self.steps: list[pb.Step] = []
        self.in_flight = 0
        self.max_in_flight = 0  # 2 when the scheduler overlaps, 1 when it does not
        self.compile_gate: asyncio.Event | None = None  # when set, compiles wait for it
        self.compiled: list[GrammarSpec] = []
        self.ended: list[int] = []  # step ids of EndDecode calls
        # Cleared: Steps wait on the worker until it is set again (a test holds one back).
        self.gate = threading.Event()
        self.gate.set()

    async def connect(self, timeout: float) -> ExecutorInfo:
        self.engine.reset()
        lim = self.engine.limits
        return ExecutorInfo(
            model_name="tiny",
            model_path="memory",
            architecture="LlamaForCausalLM",
            vocab_size=self.engine.cfg.vocab_size,
            context_length=lim.context_length,
            num_kv_slots=lim.num_slots,
            max_running_requests=lim.max_rows,
            eos_token_ids=frozenset({self.eos}),
            max_top_logprobs=lim.max_top_logprobs,
            end_decode=True,
        )

    def send(self, step: pb.Step) -> asyncio.Future[pb.StepResult]:
        self.steps.append(step)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        fut = asyncio.get_running_loop().run_in_executor(
            self.worker, self._run, step.SerializeToString()
        )
        fut.add_done_callback(self._done)
        return fut

    def _done(self, fut: asyncio.Future) -> None:
        self.in_flight -= 1

    def end_decode(self, step_id: int) -> None:
        self.ended.append(step_id)
        self.engine.end_decode(step_id)

    def _run(self, data: bytes) -> pb.StepResult:
        self.gate.wait()
        msg = pb.Step.FromString(data)
        try:
            return output_to_pb(self.engine.run_step(step_from_pb(msg)))
        except StepRejected as exc:
            return error_to_pb(msg.step_id, 3, str(exc))

    async def compile_grammar(self, grammar: gpb.Grammar) -> None:
        spec = GrammarSpec.from_pb(grammar)
        assert spec is not None and self.engine.grammar is not None
        if self.compile_gate is not None:
            await self.compile_gate.wait()
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, self.engine.grammar.compile, spec
            )
        except GrammarError as exc:
            raise InvalidRequest(f"invalid grammar: {exc}") from None
        self.compiled.append(spec)

    async def close(self) -> None:
        self.worker.shutdown(wait=False)


def link_for(hf, num_slots: int = 4096, max_rows: int = 16) -> LocalExecutor:  # type: ignore[no-untyped-def]
    """A LocalExecutor over a fresh engine of the Hugging Face model `hf`."""
    return LocalExecutor(engine_for(hf, num_slots=num_slots, max_rows=max_rows))


def rand_prompt(rng: random.Random, n: int) -> list[int]:
    """n token ids of the tiny test vocabulary."""
    return [rng.randrange(250) for _ in range(n)]
