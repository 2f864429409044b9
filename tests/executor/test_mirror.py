"""Rank 0's engine mirrored on followers (ranks as threads, commands pickled through queues as
over the pipes): warm-up, chunked prefill, decodes from the last sampled tokens, releases and a
reset give the whole model's tokens and logprobs."""

from __future__ import annotations

import pickle
import queue
from dataclasses import replace

import pytest
import torch

from services.executor.batch_builder import plan_batch
from services.executor.engine import Engine, EngineLimits
from services.executor.mirror import Follower, ForwardCommand, LeaderEngine, resolved
from services.executor.model_config import ModelConfig
from services.executor.parallel import Rank, rank_config
from services.executor.sampling_params import SamplingParams
from services.executor.step import Slice
from services.executor.weights import build_model, load_weights
from tests.executor.driver import Driver
from tests.executor.tiny import engine_for, hf_model
from tests.executor.tp_threads import run_ranks

CPU = torch.device("cpu")
LIMITS = EngineLimits(512, 8, 128)
GREEDY = SamplingParams(temperature=0, logprobs=True)
# Rows steered to tokens of the last ranks' vocabulary blocks, which only those ranks look up:
# a follower must see the tokens rank 0 sampled.
STEERED = [GREEDY, replace(GREEDY, logit_bias={250: 4.0}), replace(GREEDY, logit_bias={150: 4.0})]


class QueueConn:
    """The follower's end of a command pipe."""

    def __init__(self, q: queue.Queue[bytes | None]) -> None:
        self.q = q

    def recv_bytes(self) -> bytes:
        data = self.q.get(timeout=60)
        if data is None:
            raise EOFError
        return data


class QueueRanks:
    """Rank 0's side: every command to every follower's queue."""

    def __init__(self, queues: list[queue.Queue[bytes | None]]) -> None:
        self.queues = queues
        self.sent: list[ForwardCommand] = []

    def send(self, command: ForwardCommand) -> None:
        self.sent.append(command)
        data = pickle.dumps(command)
        for q in self.queues:
            q.put(data)

    def abort(self, reason: str) -> None:
        raise AssertionError(reason)

    def close(self) -> None:
        for q in self.queues:
            q.put(None)


def test_resolved_plan_carries_the_last_sampled_tokens() -> None:
    plan = plan_batch([Slice(0, 0, [4, 5, 6]), Slice(3, 7, [], use_last_sampled=True)])
    last = torch.tensor([0, 0, 0, 42])
    out = resolved(plan, last)
    assert out.input_ids.tolist() == [4, 5, 6, 42] and out.reuse_tok.numel() == 0
    assert plan.input_ids.tolist() == [4, 5, 6, 0]  # the plan rank 0 runs is left alone


@pytest.mark.parametrize("size", [2, 3])
def test_followers_mirror_the_leader(monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    hf = hf_model("gqa3-hd64")  # 3 query heads, 1 KV head: replicated on every rank
    cfg = ModelConfig.from_dict(hf.config.to_dict())
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [100, 3, 3, 3], [1, 2, 250, 9, 9]]
    whole = Driver(engine_for(hf, num_slots=512, max_rows=8))
    expected = [
        whole.generate(prompts, 5, chunk=4, params=STEERED),
        whole.generate(prompts[2:], 3, params=GREEDY, first_row=5),
        whole.generate(prompts[:2], 3, params=GREEDY, first_row=3),
    ]
    queues: list[queue.Queue[bytes | None]] = [queue.Queue() for _ in range(size - 1)]
    ranks = QueueRanks(queues)

    def on_rank(rank: Rank) -> list | None:
        model = build_model(cfg, 128, torch.float32, CPU, rank)
        load_weights(model, hf.state_dict().items())
        parts = (model, rank_config(cfg, rank), LIMITS, CPU)
        if rank.index:
            Follower(Engine(*parts), QueueConn(queues[rank.index - 1])).run()
            return None
        leader = LeaderEngine(*parts, ranks=ranks)
        try:
            leader.warmup(batch_sizes=(1, 2), prompt_len=8)
            driver = Driver(leader)
            jobs = [
                driver.generate(prompts, 5, chunk=4, params=STEERED),
                driver.generate(prompts[2:], 3, params=GREEDY, first_row=5),
            ]
            leader.reset()
            driver.next_slot = 1  # the same slots again, now for other rows
            return [*jobs, driver.generate(prompts[:2], 3, params=GREEDY, first_row=3)]
        finally:
            ranks.close()

    got = run_ranks(monkeypatch, size, on_rank)[0]
    assert got is not None
    for ours, ref in zip(got, expected, strict=True):
        for a, b in zip(ours, ref, strict=True):
            assert a.output == b.output
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    kinds = [type(c).__name__ for cmd in ranks.sent for c in cmd.changes]
    assert {"TableWrites", "ReleasedRows", "TableReset", "PaddingSlotZeroed"} <= set(kinds)
