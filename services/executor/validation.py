"""Checks a Step against the engine's state before anything of it is applied."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from services.executor.step import SharedPrefix, Slice, StepInput

if TYPE_CHECKING:
    from services.executor.engine import Engine


class StepRejected(ValueError):
    """The Step is invalid; nothing of it was applied (maps to INVALID_ARGUMENT)."""


def validate_step(step: StepInput, engine: Engine) -> None:
    """Checks `step` against `engine.planned`: the rows (and whether each has sampled a token)
    as all steps accepted before it leave them, whether or not those have run yet."""
    active = set(engine.planned)
    _check_releases(step, active)
    active -= set(step.release_rows)
    _check_adds(step, active, engine)
    active |= {a.row for a in step.add}
    _check_writes(step, active, engine)
    _check_slices(step, active, engine)
    _check_decode_steps(step, engine)
    _check_shared_prefixes(step, engine)


def advance_plan(planned: dict[int, bool], step: StepInput) -> None:
    """Applies a valid `step` to `planned` (row -> has a sampled token)."""
    for row in step.release_rows:
        del planned[row]
    for req in step.add:
        planned[req.row] = False
    for s in step.slices:
        if s.sample:
            planned[s.row] = True


def _fail(message: str) -> None:
    raise StepRejected(message)


def _check_releases(step: StepInput, active: set[int]) -> None:
    if len(set(step.release_rows)) != len(step.release_rows):
        _fail("a row is released twice")
    for row in step.release_rows:
        if row not in active:
            _fail(f"release of row {row}, which is not active")


def _check_adds(step: StepInput, active: set[int], engine: Engine) -> None:
    seen: set[int] = set()
    vocab = engine.cfg.vocab_size
    for req in step.add:
        if req.row >= engine.limits.max_rows:
            _fail(f"row {req.row} out of range (max_running_requests {engine.limits.max_rows})")
        if req.row in active or req.row in seen:
            _fail(f"row {req.row} is already active")
        seen.add(req.row)
        try:
            req.sampling.validate(vocab, engine.limits.max_top_logprobs)
        except ValueError as exc:
            _fail(f"request {req.request_id!r}: {exc}")
        if any(not 0 <= t < vocab for t in req.prompt_ids) or any(
            not 0 <= t < vocab for t in req.output_ids
        ):
            _fail(f"request {req.request_id!r}: token id out of vocabulary ({vocab})")


def _check_writes(step: StepInput, active: set[int], engine: Engine) -> None:
    ctx, slots = engine.limits.context_length, engine.limits.num_slots
    for w in step.writes:
        if w.row not in active:
            _fail(f"slot write to row {w.row}, which is not active")
        if w.start + len(w.kv_indices) > ctx:
            _fail(f"slot write past the context length {ctx} (row {w.row})")
        if w.kv_indices and (min(w.kv_indices) < 1 or max(w.kv_indices) > slots):
            _fail(f"KV slot index out of range 1..{slots} (row {w.row})")


def _check_slices(step: StepInput, active: set[int], engine: Engine) -> None:
    ctx, vocab = engine.limits.context_length, engine.cfg.vocab_size
    seen: set[int] = set()
    for s in step.slices:
        if s.row not in active:
            _fail(f"slice for row {s.row}, which is not active")
        if s.row in seen:
            _fail(f"two slices for row {s.row}")
        seen.add(s.row)
        if s.use_last_sampled:
            if s.input_ids:
                _fail(f"slice for row {s.row} has input ids and use_last_sampled")
            new = any(a.row == s.row for a in step.add)
            if new or not engine.planned.get(s.row, False):
                _fail(f"row {s.row} has no sampled token to use")
        elif not s.input_ids:
            _fail(f"empty slice for row {s.row}")
        if s.start + s.length > ctx:
            _fail(
                f"slice of row {s.row} ends at {s.start + s.length}, past the context length {ctx}"
            )
        if s.input_ids and (min(s.input_ids) < 0 or max(s.input_ids) >= vocab):
            _fail(f"token id out of vocabulary ({vocab}) in the slice of row {s.row}")
        _check_prompt_logprobs(s, vocab)


def _check_decode_steps(step: StepInput, engine: Engine) -> None:
    k, ctx = step.decode_steps, engine.limits.context_length
    if k == 1:
        return
    if k < 1:
        _fail(f"decode_steps {k} is not positive")
    for s in step.slices:
        if not (s.use_last_sampled and s.sample):
            _fail(f"decode_steps {k}: the slice of row {s.row} is not a sampled decode")
        if s.start + k > ctx:
            _fail(
                f"decode_steps {k}: row {s.row} would decode past the context length {ctx} "
                f"(from position {s.start})"
            )


def check_decode_rows(step: StepInput, engine: Engine) -> None:
    """Raises StepRejected when a multi-step decode names a row with a grammar (its mask and
    forced tokens need the scheduler between tokens). Reads the rows as the Steps before this one
    left them (its slices' rows all sampled before, so none joins in it); changes nothing."""
    if step.decode_steps == 1:
        return
    for s in step.slices:
        state = engine.rows.get(s.row)
        if state is not None and state.matcher is not None:
            _fail(f"decode_steps {step.decode_steps}: row {s.row} has a grammar")


def _check_prompt_logprobs(s: Slice, vocab: int) -> None:
    if s.next_token_id is not None:
        if s.logprob_start is None or s.sample:
            _fail(f"slice of row {s.row}: next_token_id needs logprob_start and no sample")
        if not 0 <= s.next_token_id < vocab:
            _fail(f"next_token_id out of vocabulary ({vocab}) in the slice of row {s.row}")
    if s.logprob_start is None:
        return
    if s.use_last_sampled:
        _fail(f"slice of row {s.row}: logprob_start with use_last_sampled")
    if not s.start <= s.logprob_start < s.start + s.length or not s.prompt_positions:
        _fail(
            f"slice of row {s.row}: logprob_start {s.logprob_start} leaves no position with a "
            f"known next token in {s.start}..{s.start + s.length - 1}"
        )


def _check_shared_prefixes(step: StepInput, engine: Engine) -> None:
    starts = {s.row: s.start for s in step.slices}
    grouped: set[int] = set()
    for span in step.shared_prefixes:
        if span.length < 1 or not span.rows:
            _fail(f"shared prefix of length {span.length} over {len(span.rows)} rows")
        for row in span.rows:
            if row not in starts:
                _fail(f"shared prefix row {row} has no slice in this step")
            if row in grouped:
                _fail(f"row {row} is in two shared prefixes")
            grouped.add(row)
            if span.length > starts[row]:
                _fail(f"shared prefix of length {span.length} past the start of row {row}")


def check_shared_slots(step: StepInput, engine: Engine) -> None:
    """Raises StepRejected unless every shared span's rows hold the same, set KV slots once this
    Step's releases and writes apply. Reads the table as the Steps before this one left it, so
    it runs when the Step is executed, not when it is prepared; changes nothing."""
    for span in step.shared_prefixes:
        if not bool((_slots_after_writes(step, engine, span) > 0).all()):
            _fail(f"shared prefix over rows {span.rows}: positions differ or are unset")


def _slots_after_writes(step: StepInput, engine: Engine, span: SharedPrefix) -> torch.Tensor:
    """[length] the span's slots if every row holds the same ones after this step's releases
    and writes, else a zero tensor; reads the table without changing it."""
    n = span.length
    rows = torch.tensor(span.rows, dtype=torch.int64, device=engine.device)
    slots = engine.table.table[rows, :n]  # [R, n], a copy (advanced indexing)
    member = {row: i for i, row in enumerate(span.rows)}
    for row in step.release_rows:
        if row in member:
            slots[member[row]] = 0
    for w in step.writes:
        if w.row in member and w.start < n:
            kv = w.kv_indices[: n - w.start]
            slots[member[w.row], w.start : w.start + len(kv)] = torch.tensor(kv, device=rows.device)
    if not bool((slots == slots[:1]).all()):
        return torch.zeros(n, dtype=torch.int64)
    return slots[0]
