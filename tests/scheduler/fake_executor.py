"""A model-free executor that checks every KV slot the scheduler points at.

Each KV slot holds (position, token, h) where h chains the hash of every token before it:
h[p] = mix(h[p-1], token[p], p). Computing a slice first re-verifies the whole chain its row's
table reaches — so a slot freed too early and overwritten, a stale table entry or a missing write
fails loudly — and then "samples" from the chain: the next token is a pure function of the full
prefix, exactly like greedy decoding of a real model, but with no numerics to tie. `reference()`
gives what any prompt must produce.

Steps are applied in order when sent (like the real executor's single ordered stream); their
results resolve later on the event loop, so the scheduler's overlap is exercised for real.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

from radixserve.v1 import executor_pb2 as pb
from services.scheduler.errors import ExecutorLost
from services.scheduler.executor_client import ExecutorInfo

VOCAB = 256
EOS = 255
SAMPLE_MOD = 250  # sampled ids are < 250 unless a test makes them stop tokens


def mix(h: int, token: int, pos: int) -> int:
    return hash((h, token, pos)) & 0xFFFF_FFFF_FFFF


def pick(h: int, banned: set[int]) -> int:
    tok = h % SAMPLE_MOD
    while tok in banned:
        tok = (tok + 1) % SAMPLE_MOD
    return tok


def reference(
    prompt: list[int], max_tokens: int, stops: frozenset[int] = frozenset(), min_tokens: int = 0
) -> tuple[list[int], int | None]:
    """(output tokens without a matched stop token, the matched stop token or None)."""
    h = 0
    for pos, t in enumerate(prompt):
        h = mix(h, t, pos)
    out: list[int] = []
    while len(out) < max_tokens:
        tok = pick(h, set(stops) if len(out) < min_tokens else set())
        if tok in stops and len(out) >= min_tokens:
            return out, tok
        h = mix(h, tok, len(prompt) + len(out))
        out.append(tok)
    return out, None


class StepError(Exception):
    pass


@dataclass
class Row:
    banned: set[int]
    table: dict[int, int] = field(default_factory=dict)  # position -> slot
    last_sampled: int | None = None


class FakeExecutor:
    """ExecutorLink with `num_slots` checked KV slots and `max_rows` rows."""

    def __init__(
        self, num_slots: int, max_rows: int, context_length: int = 4096, delay: float = 0.0
    ) -> None:
        self.num_slots, self.max_rows, self.context = num_slots, max_rows, context_length
        self.delay = delay
        self.rows: dict[int, Row] = {}
        self.pool: dict[int, tuple[int, int, int]] = {}  # slot -> (position, token, h)
        self.steps: list[pb.Step] = []
        self.errors: list[str] = []
        self.connects = 0
        self.lose_at_step: int | None = None  # the stream "breaks" when this many steps were sent
        self.reject_at_step: int | None = None  # this step gets StepResult.error
        self._fresh: dict[int, int] = {}
        self.shared_prefix_rows = 0  # rows sent in shared prefixes, over all steps
        self.device = ""  # the device type its Info reports
        # Whether its Info claims EndDecode: it computes each Step when sent, so an EndDecode
        # always comes after the Step has run, which changes nothing.
        self.end_decode = True

    async def connect(self, timeout: float) -> ExecutorInfo:
        self.rows.clear()
        self.connects += 1
        return ExecutorInfo(
            model_name="fake",
            model_path="fake",
            architecture="Fake",
            vocab_size=VOCAB,
            context_length=self.context,
            num_kv_slots=self.num_slots,
            max_running_requests=self.max_rows,
            eos_token_ids=frozenset({EOS}),
            max_top_logprobs=5,
            device=self.device,
            end_decode=self.end_decode,
        )

    def send(self, step: pb.Step) -> asyncio.Future[pb.StepResult]:
        self.steps.append(step)
        fut = asyncio.get_running_loop().create_future()
        if self.lose_at_step is not None and len(self.steps) >= self.lose_at_step:
            self.lose_at_step = None
            fut.set_exception(ExecutorLost("the executor went away"))
            return fut
        try:
            if len(self.steps) == self.reject_at_step:
                raise StepError("rejected on purpose")
            result = self._apply(step)
        except StepError as exc:
            self.errors.append(str(exc))
            result = pb.StepResult(
                step_id=step.step_id, error=pb.StepError(code=3, message=str(exc))
            )
        asyncio.get_running_loop().call_later(self.delay, _resolve, fut, result)
        return fut

    def end_decode(self, step_id: int) -> None:
        pass  # the fake runs every iteration, as an executor that ignores it may

    async def close(self) -> None:
        pass

    # ---- a Step -------------------------------------------------------------------------------

    def _apply(self, step: pb.Step) -> pb.StepResult:
        self._validate(step)
        for r in step.release_rows:
            del self.rows[r]
        for a in step.add:
            banned = {t for t, b in a.sampling.logit_bias.items() if b == -math.inf}
            self.rows[a.row] = Row(banned)
        for w in step.writes:
            for i, slot in enumerate(w.kv_indices):
                self.rows[w.row].table[w.start + i] = slot
        result = pb.StepResult(step_id=step.step_id)
        self._fresh = {slot: s.row for s in step.slices for slot in self._slots_of(s)}
        self._check_shared_prefixes(step)
        iterations = max(1, step.decode_steps)
        if iterations > 1:
            _require(all(s.use_last_sampled for s in step.slices), "a multi-step with a prefill")
            result.decode_iterations = iterations
        for i in range(iterations):
            # Iteration i of a multi-step decode: every row one position further.
            slices = [
                pb.Slice(row=s.row, start=s.start + i, use_last_sampled=True, sample=True)
                if i
                else s
                for s in step.slices
            ]
            # A slot written by one row's slice must not be read by another row in the same
            # forward.
            self._fresh = {slot: s.row for s in slices for slot in self._slots_of(s)}
            for s in slices:
                token = self._compute(s)
                result.num_tokens += 1 if s.use_last_sampled else len(s.input_ids)
                if s.sample:
                    result.rows.append(s.row)
                    result.token_ids.append(token)
                    result.logprobs.append(-1.0)
        return result

    def _validate(self, step: pb.Step) -> None:
        active = set(self.rows)
        for r in step.release_rows:
            _require(r in active, f"release of inactive row {r}")
            active.discard(r)
        for a in step.add:
            _require(a.row not in active and a.row < self.max_rows, f"bad add of row {a.row}")
            active.add(a.row)
        for w in step.writes:
            _require(w.row in active, f"write to inactive row {w.row}")
            _require(all(1 <= s <= self.num_slots for s in w.kv_indices), "slot out of range")
        rows = [s.row for s in step.slices]
        _require(len(rows) == len(set(rows)), "two slices for one row")
        added = {a.row for a in step.add}
        for s in step.slices:
            _require(s.row in active, f"slice for inactive row {s.row}")
            if s.use_last_sampled:
                _require(
                    s.row not in added and self.rows[s.row].last_sampled is not None,
                    "no last token",
                )

    def _check_shared_prefixes(self, step: pb.Step) -> None:
        """Each span's rows have slices starting at or past it and hold the same slots for its
        positions, all written by earlier steps."""
        starts = {s.row: s.start for s in step.slices}
        grouped: set[int] = set()
        for span in step.shared_prefixes:
            _require(span.length >= 1 and len(span.rows) > 0, "empty shared prefix")
            first = [self.rows[span.rows[0]].table.get(p) for p in range(span.length)]
            for row in span.rows:
                _require(row not in grouped, f"row {row} in two shared prefixes")
                grouped.add(row)
                _require(span.length <= starts.get(row, -1), f"shared prefix past row {row}")
                table = self.rows[row].table
                same = all(table.get(p) == slot for p, slot in enumerate(first))
                _require(same, f"row {row}: shared prefix slots differ")
            _require(
                all(slot in self.pool and slot not in self._fresh for slot in first),
                "shared prefix over slots not computed before this step",
            )
        self.shared_prefix_rows += len(grouped)

    def _compute(self, s: pb.Slice) -> int:
        row = self.rows[s.row]
        h = self._verify_prefix(row, s.start)
        ids = [row.last_sampled] if s.use_last_sampled else list(s.input_ids)
        for i, tok in enumerate(ids):
            pos = s.start + i
            slot = row.table.get(pos)
            _require(slot is not None, f"row {s.row}: no slot for position {pos}")
            h = mix(h, tok, pos)
            self.pool[slot] = (pos, tok, h)
        token = pick(h, row.banned)
        if s.sample:
            row.last_sampled = token
        return token

    def _slots_of(self, s: pb.Slice) -> list[int]:
        n = 1 if s.use_last_sampled else len(s.input_ids)
        table = self.rows[s.row].table
        return [table[p] for p in range(s.start, s.start + n) if p in table]

    def _verify_prefix(self, row: Row, end: int) -> int:
        """Checks positions 0..end-1 of the row chain together; returns h[end-1] (0 if end == 0)."""
        h = 0
        for pos in range(end):
            slot = row.table.get(pos)
            _require(
                slot is not None and slot in self.pool, f"position {pos}: slot {slot} never written"
            )
            _require(
                slot not in self._fresh, f"position {pos}: slot {slot} is written in this same step"
            )
            p, tok, stored = self.pool[slot]
            _require(
                p == pos and stored == mix(h, tok, pos),
                f"position {pos}: slot {slot} holds other KV",
            )
            h = stored
        return h


def _resolve(fut: asyncio.Future, result: pb.StepResult) -> None:
    if not fut.done():  # the scheduler cancels what is in flight when it gives up on a stream
        fut.set_result(result)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise StepError(message)
