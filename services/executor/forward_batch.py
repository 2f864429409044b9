"""What one forward pass computes: tokens, their positions and KV slots, and per-request slices.

Slices are ordered extend-first: the tokens of the `num_extend` extend slices (several tokens each,
any with a cached prefix) come first, then one token per decode slice. Attention backends treat
the two parts separately so a long prefill chunk never pads the decodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SharedSpans:
    """Groups of query tokens whose rows share a cached prefix (a Step's shared_prefixes).

    Group g's tokens are `tok_idx[tok_offsets[g] : tok_offsets[g + 1]]` (all tokens of its slices);
    they all see keys 0 .. lens[g]-1 through table row `rows[g]` (any member's row: the slots are
    the same), and each slice's own keys start at `key_starts`.
    """

    tok_idx: torch.Tensor  # [N] int64, indices into the batch's tokens, grouped contiguously
    tok_offsets: torch.Tensor  # [G + 1] int64
    rows: torch.Tensor  # [G] int64, a table row holding each group's span
    lens: torch.Tensor  # [G] int64, shared positions per group
    key_starts: torch.Tensor  # [S] int64, per slice: lens of its group, 0 when ungrouped
    max_group_tokens: int = 0  # the most tokens of any one group (host-side, sizes kernel grids)


@dataclass
class ForwardBatch:
    # Per token, T = num_extend_tokens + num_decode.
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    out_cache_loc: torch.Tensor  # [T] int64, the KV slot each token's K/V is stored into
    # Per slice, S = num_extend + num_decode; slice i covers positions start[i] .. seq_lens[i]-1.
    rows: torch.Tensor  # [S] int64, rows of the request→KV-slot table
    starts: torch.Tensor  # [S] int64, cached prefix length before the slice
    seq_lens: torch.Tensor  # [S] int64, prefix + slice length
    num_extend: int
    num_extend_tokens: int
    # Host copies of the lengths, for building padded layouts without device syncs.
    extend_lens_cpu: list[int] = field(default_factory=list)
    seq_lens_cpu: list[int] = field(default_factory=list)
    # Token indices whose logits are sampled, in result order.
    sample_token_idx: torch.Tensor | None = None
    # Token indices whose logits give prompt logprobs, returned after the sampled ones (None: none).
    prompt_token_idx: torch.Tensor | None = None
    # Shared cached prefixes, read once per group (None: every slice reads its own keys).
    shared: SharedSpans | None = None
    # Backend-specific per-step metadata, built once and shared by every layer.
    attn_metadata: object | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_decode(self) -> int:
        return int(self.rows.shape[0]) - self.num_extend

    @property
    def logits_token_idx(self) -> torch.Tensor | None:
        """Token indices whose logits the forward returns, in order: the sampled ones, then the
        prompt-logprob ones; None: every token."""
        if self.prompt_token_idx is None or self.sample_token_idx is None:
            return self.sample_token_idx
        return torch.cat([self.sample_token_idx, self.prompt_token_idx])
