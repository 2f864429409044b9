"""Per-row token counts for presence / frequency / repetition penalties, kept on the device.

Only rows whose sampling params have a penalty hold a slot here, so the state is a few rows of
`[vocab]` even when `max_running_requests` is large. A slot is filled once when its row is added
(prompt ids, and the counts of output ids the request already has, e.g. after retraction) and then
updated by a scatter of each newly sampled token; nothing is rebuilt from Python lists.

Penalties change only the logits of touched ids (in the prompt or sampled), so each slot also keeps
the list of its touched ids; applying penalties reads and writes `[n, touched]`, not `[n, vocab]`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from services.executor.sampling_params import SamplingParams


def needs_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.has_penalties


@dataclass
class Touched:
    """The touched ids of n rows and their output counts. Rows with fewer ids than the widest
    are padded with their own first id (so a pad computes the same value as that id); a row
    without any id has `valid` False and its pads must be left as they are."""

    ids: torch.Tensor  # [n, L] int64
    counts: torch.Tensor  # [n, L] float32: occurrences of ids[i, j] in row i's output
    valid: torch.Tensor  # [n, 1] bool


def touched_from_lists(
    prompts: list[list[int]], outputs: list[list[int]], device: torch.device
) -> Touched:
    """`Touched` of rows given as prompt and output id lists."""
    ids = [list(dict.fromkeys(p + o)) for p, o in zip(prompts, outputs, strict=True)]
    width = max(1, max(len(x) for x in ids))
    counts = [Counter(o) for o in outputs]
    ids_rows = [x + [x[0] if x else 0] * (width - len(x)) for x in ids]
    count_rows = [[float(c[t]) for t in row] for c, row in zip(counts, ids_rows, strict=True)]
    return Touched(
        torch.tensor(ids_rows, dtype=torch.int64, device=device),
        torch.tensor(count_rows, dtype=torch.float32, device=device),
        torch.tensor([[bool(x)] for x in ids], dtype=torch.bool, device=device),
    )


class PenaltyState:
    """counts[slot, v]: how often the row holding `slot` sampled token v (float32, exact to 2^24);
    ids[slot, :length[slot]]: the ids it touched (its distinct prompt and initial output ids, then
    each sampled token, repeats included). Grows by doubling; slots are reused."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size, self.device = vocab_size, device
        self.slot_of: dict[int, int] = {}
        self.free: list[int] = []
        self.length: list[int] = []
        self.counts = torch.zeros((0, vocab_size), dtype=torch.float32, device=device)
        self.ids = torch.zeros((0, 64), dtype=torch.int64, device=device)

    def add(self, row: int, prompt_ids: list[int], output_ids: list[int]) -> None:
        """Tracks `row` (which must not be tracked yet) from its prompt and existing output."""
        assert row not in self.slot_of, f"row {row} already tracked"
        slot = self._take_slot()
        self.slot_of[row] = slot
        self.counts[slot].zero_()
        if output_ids:
            out = self._ids(output_ids)
            self.counts[slot].index_add_(0, out, torch.ones_like(out, dtype=torch.float32))
        touched = list(dict.fromkeys(prompt_ids + output_ids))
        self._reserve(len(touched))
        self.ids[slot].zero_()
        if touched:
            self.ids[slot, : len(touched)] = self._ids(touched)
        self.length[slot] = len(touched)

    def release(self, row: int) -> None:
        slot = self.slot_of.pop(row, None)
        if slot is not None:
            self.free.append(slot)

    def clear(self) -> None:
        self.free.extend(self.slot_of.values())
        self.slot_of.clear()

    def tracks(self, row: int | None) -> bool:
        return row is not None and row in self.slot_of

    def record(self, rows: list[int | None], token_ids: torch.Tensor) -> None:
        """Counts token_ids[i] ([S] int64, on the device) for each tracked rows[i]."""
        sel = [i for i, r in enumerate(rows) if self.tracks(r)]
        if not sel:
            return
        slot_list = [self.slot_of[rows[i]] for i in sel]  # type: ignore[index]
        slots = self._ids(slot_list)
        tokens = token_ids[self._ids(sel)] if len(sel) < len(rows) else token_ids
        ones = torch.ones(len(sel), dtype=torch.float32, device=self.device)
        self.counts.index_put_((slots, tokens), ones, accumulate=True)
        self._reserve(max(self.length[s] for s in slot_list) + 1)
        self.ids.index_put_((slots, self._ids([self.length[s] for s in slot_list])), tokens)
        for s in slot_list:
            self.length[s] += 1

    def touched(self, rows: list[int]) -> Touched:
        """`Touched` of tracked rows."""
        slot_list = [self.slot_of[r] for r in rows]
        slots = self._ids(slot_list)
        lengths = [self.length[s] for s in slot_list]
        width = max(1, max(lengths))
        ids = self.ids[slots, :width]
        pos = torch.arange(width, device=self.device)
        ids = ids.where(pos < self._ids(lengths)[:, None], ids[:, :1])
        valid = torch.tensor([[n > 0] for n in lengths], dtype=torch.bool, device=self.device)
        return Touched(ids, self.counts[slots[:, None], ids], valid)

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.int64, device=self.device)

    def _reserve(self, width: int) -> None:
        if width > self.ids.shape[1]:
            grow = max(width, 2 * self.ids.shape[1]) - self.ids.shape[1]
            self.ids = torch.cat([self.ids, self.ids.new_zeros(self.ids.shape[0], grow)], 1)

    def _take_slot(self) -> int:
        if not self.free:
            cap = self.counts.shape[0]
            grow = max(4, cap)
            self.counts = torch.cat([self.counts, self.counts.new_zeros(grow, self.vocab_size)])
            self.ids = torch.cat([self.ids, self.ids.new_zeros(grow, self.ids.shape[1])])
            self.length.extend([0] * grow)
            self.free.extend(range(cap + grow - 1, cap - 1, -1))
        return self.free.pop()
