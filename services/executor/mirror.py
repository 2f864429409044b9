"""Rank 0's engine mirrored on the follower ranks of a tensor-parallel executor.

Rank 0 runs the whole Engine: validation, rows, sampling, grammars. A follower holds only what a
forward reads — its model shard, its KV pool (its own KV heads, the same slots), the request→slot
table — and runs exactly the forwards rank 0 runs, in the same order, so their collectives pair
up. Before each forward, rank 0 sends a `ForwardCommand`: the table changes applied since the
previous forward (releases, slot writes, resets) and the batch plan with every input token
resolved (the tokens rank 0 sampled last, which only it knows). Nothing is sent back: the
logits reach rank 0 through the model's own gather.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any

import torch

from services.executor.batch_builder import BatchPlan
from services.executor.engine import Engine, PreparedStep
from services.executor.kv_pool import TableWrites
from services.executor.ranks import RankGroup, receive

log = logging.getLogger("radixserve.executor")


@dataclass(frozen=True)
class ReleasedRows:
    rows: list[int]


@dataclass(frozen=True)
class TableReset:
    pass


@dataclass(frozen=True)
class PaddingSlotZeroed:
    pass


TableChange = ReleasedRows | TableWrites | TableReset | PaddingSlotZeroed


@dataclass
class ForwardCommand:
    changes: list[TableChange] = field(default_factory=list)  # in the order rank 0 applied them
    plan: BatchPlan | None = None  # with every input id resolved (no reuse of sampled tokens)


def resolved(plan: BatchPlan, last_sampled: torch.Tensor) -> BatchPlan:
    """`plan` with the tokens it takes from the last sampled buffer written into its input ids."""
    if not plan.reuse_tok.numel():
        return plan
    ids = plan.input_ids.clone()
    ids[plan.reuse_tok] = last_sampled[plan.reuse_rows.to(last_sampled.device)].cpu()
    empty = plan.reuse_tok[:0]
    return replace(plan, input_ids=ids, reuse_tok=empty, reuse_rows=empty)


class LeaderEngine(Engine):
    """Rank 0's engine: the Engine, recording its table changes and sending each forward to the
    followers first. A forward that fails once the followers have it leaves the ranks out of
    step, so it ends the executor (`RankGroup.abort`) instead of being retried."""

    def __init__(self, *args: Any, ranks: RankGroup, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ranks = ranks
        self._changes: list[TableChange] = []  # applied here, not yet sent

    def reset(self) -> None:
        super().reset()
        self._changes = [TableReset()]  # what came before it no longer matters

    def warmup(self, *args: Any, **kwargs: Any) -> None:
        super().warmup(*args, **kwargs)
        self._changes.append(PaddingSlotZeroed())

    def _apply_membership(self, prepared: PreparedStep) -> None:
        super()._apply_membership(prepared)  # applies everything or raises with nothing applied
        if prepared.step.release_rows:
            self._changes.append(ReleasedRows(list(prepared.step.release_rows)))
        if prepared.writes is not None:
            self._changes.append(prepared.writes)

    def run_forward(self, plan: BatchPlan | None) -> torch.Tensor:
        assert plan is not None, "a step without slices has no forward"
        self.ranks.send(ForwardCommand(self._changes, resolved(plan, self.last_sampled)))
        self._changes = []
        try:
            return super().run_forward(plan)
        except Exception as exc:
            log.exception("tensor-parallel forward failed on rank 0")
            self.ranks.abort(f"tensor-parallel forward failed on rank 0: {type(exc).__name__}")


class Follower:
    """A follower rank: applies rank 0's commands to its engine until rank 0 closes the pipe."""

    def __init__(self, engine: Engine, conn: Connection) -> None:
        self.engine, self.conn = engine, conn

    def run(self) -> None:
        while (command := receive(self.conn)) is not None:
            assert isinstance(command, ForwardCommand)
            for change in command.changes:
                self.apply(change)
            if command.plan is not None:
                self.engine.run_forward(command.plan)  # the logits went to rank 0

    def apply(self, change: TableChange) -> None:
        table = self.engine.table
        if isinstance(change, TableReset):
            table.reset()
        elif isinstance(change, ReleasedRows):
            table.clear_rows(change.rows)
        elif isinstance(change, TableWrites):
            table.write_many(change)
        else:
            self.engine.pool.zero_slot(0)
