"""Tensor parallelism applied to a built model: which part of each weight a rank holds, and the
collectives that add the parts up again.

Applied from outside the model files, after the model is built on the meta device and before its
weights are loaded: `shard_model` swaps each layer for one sized for the rank, tags it with a
`WeightShard` that the weight loader asks for the rank's part of each checkpoint tensor, and
registers the collectives as forward hooks on the modules whose output is a partial sum.

- attention: q/k/v column-parallel by heads, o_proj row-parallel, then an all-reduce;
- MLP: gate/up column-parallel, down_proj row-parallel, then an all-reduce;
- embedding: vocabulary-parallel (a rank looks up its own rows, zeros elsewhere), all-reduce;
- LM head: vocabulary-parallel, the logits gathered on rank 0, where sampling runs.

Heads (`head_shard`): query heads are split as evenly as possible. A rank holds the KV heads its
query heads read, so a KV head is replicated on every rank whose query heads read it when the
ranks do not divide the KV heads (3 KV heads on 2 ranks: the middle one on both). The attention
backends pair query head h with KV head h // group, so a rank whose query heads span several
KV groups without covering them whole computes the whole groups and drops the heads it does not
own: their o_proj columns are zero.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from services.executor.layers import MergedLinear
from services.executor.model_config import ModelConfig


@dataclass(frozen=True)
class Rank:
    index: int
    size: int

    def __post_init__(self) -> None:
        assert 0 <= self.index < self.size, (self.index, self.size)


def split_evenly(n: int, parts: int, index: int) -> range:
    """Part `index` of range(n) cut into `parts` contiguous parts, the first n % parts of them
    one longer than the rest."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


@dataclass(frozen=True)
class HeadShard:
    """The attention heads of one rank, as global head indices."""

    q_heads: range  # query heads computed: `owned`, widened to whole KV groups where needed
    owned: range  # query heads whose output the rank adds to the sum
    kv_heads: range  # KV heads in the rank's pool; q_heads[i] reads kv_heads[i // local group]


def head_shard(num_heads: int, num_kv_heads: int, rank: Rank) -> HeadShard:
    if rank.size > num_heads:
        raise ValueError(f"--tp {rank.size} exceeds the model's {num_heads} attention heads")
    group = num_heads // num_kv_heads
    owned = split_evenly(num_heads, rank.size, rank.index)
    kv = range(owned.start // group, (owned.stop - 1) // group + 1)
    # Inside one group every query head reads the same KV head; across groups the backends need
    # whole groups, so the partial ones at either end are completed.
    q = owned if len(kv) == 1 else range(kv.start * group, kv.stop * group)
    return HeadShard(q, owned, kv)


def kv_heads_per_rank(num_heads: int, num_kv_heads: int, size: int) -> list[int]:
    return [len(head_shard(num_heads, num_kv_heads, Rank(r, size)).kv_heads) for r in range(size)]


def vocab_shard(vocab_size: int, rank: Rank) -> tuple[range, int]:
    """The token ids a rank holds and the padded rows every rank allocates (ceil(V / size)), so
    the gathered logits are equal-sized blocks; padding rows are zero and cut off after the
    gather."""
    per_rank = -(-vocab_size // rank.size)
    start = min(rank.index * per_rank, vocab_size)
    return range(start, min(start + per_rank, vocab_size)), per_rank


# --- the rank's part of a checkpoint tensor --------------------------------------------------------


class WeightShard:
    """Cuts a rank's part out of a full checkpoint tensor for the module it is attached to (as
    `module.tp_shard`). `part` is the index of a stacked source weight (q, k, v; gate, up) or
    None; biases follow their weight's rows."""

    def local(self, full: torch.Tensor, part: int | None, is_bias: bool) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class RowsShard(WeightShard):
    """Column-parallel: output rows `rows[part]` of each stacked source weight."""

    rows: tuple[range, ...]

    def local(self, full: torch.Tensor, part: int | None, is_bias: bool) -> torch.Tensor:
        rows = self.rows[part or 0]
        return full[rows.start : rows.stop]


@dataclass(frozen=True)
class ColumnsShard(WeightShard):
    """Row-parallel: input columns `cols` at `dst` .. of a [out, width] weight, zero elsewhere
    (the columns of heads computed but not owned). The bias is added once, on rank 0."""

    cols: range
    dst: int
    width: int
    keeps_bias: bool

    def local(self, full: torch.Tensor, part: int | None, is_bias: bool) -> torch.Tensor:
        if is_bias:
            return full if self.keeps_bias else torch.zeros_like(full)
        out = full.new_zeros(full.shape[0], self.width)
        out[:, self.dst : self.dst + len(self.cols)] = full[:, self.cols.start : self.cols.stop]
        return out


@dataclass(frozen=True)
class VocabShard(WeightShard):
    """Vocabulary-parallel: the rows of token ids `rows`, zero-padded to `padded` rows."""

    rows: range
    padded: int

    def local(self, full: torch.Tensor, part: int | None, is_bias: bool) -> torch.Tensor:
        out = full.new_zeros(self.padded, *full.shape[1:])
        out[: len(self.rows)] = full[self.rows.start : self.rows.stop]
        return out


# --- layers and collectives ------------------------------------------------------------------------


class VocabParallelEmbedding(nn.Module):
    """The rows of token ids `vocab` ([padded, hidden]); other ids look up zeros, and the
    all-reduce adds the one rank's row that holds each id."""

    def __init__(self, vocab: range, padded: int, hidden_size: int) -> None:
        super().__init__()
        self.start, self.stop = vocab.start, vocab.stop
        self.weight = nn.Parameter(torch.empty(padded, hidden_size))
        self.tp_shard = VocabShard(vocab, padded)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [T] → [T, hidden]
        inside = (ids >= self.start) & (ids < self.stop)
        out = F.embedding(torch.where(inside, ids - self.start, 0), self.weight)
        out.masked_fill_(~inside.unsqueeze(-1), 0)
        dist.all_reduce(out)
        return out


def _all_reduce(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
    dist.all_reduce(output)  # in place: the ranks' partial sums add up to the full output


class _GatherLogits:
    """Forward hook of the whole model: rank 0 gets the full logits [T, vocab] from every rank's
    [T, padded] block; the other ranks keep their own block (they do not sample)."""

    def __init__(self, vocab_size: int, rank: Rank) -> None:
        self.vocab_size, self.rank = vocab_size, rank

    def __call__(self, _module: nn.Module, _inputs: object, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.contiguous()
        if self.rank.index != 0:
            dist.gather(logits, None, dst=0)
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.rank.size)]
        dist.gather(logits, parts, dst=0)
        return torch.cat(parts, dim=-1)[:, : self.vocab_size]


def _scaled(heads: range, head_dim: int) -> range:
    return range(heads.start * head_dim, heads.stop * head_dim)


def _shard_attention(attn: nn.Module, heads: HeadShard, rank: Rank) -> None:
    d = attn.head_dim
    nq, nkv = len(heads.q_heads), len(heads.kv_heads)
    qkv, o = attn.qkv_proj, attn.o_proj
    kv_rows = _scaled(heads.kv_heads, d)
    attn.qkv_proj = MergedLinear(qkv.in_features, [nq * d, nkv * d, nkv * d], qkv.bias is not None)
    attn.qkv_proj.tp_shard = RowsShard((_scaled(heads.q_heads, d), kv_rows, kv_rows))
    attn.o_proj = nn.Linear(nq * d, o.out_features, bias=o.bias is not None)
    attn.o_proj.tp_shard = ColumnsShard(
        _scaled(heads.owned, d),
        (heads.owned.start - heads.q_heads.start) * d,
        nq * d,
        rank.index == 0,
    )
    attn.num_heads, attn.num_kv_heads = nq, nkv
    attn.split = [nq * d, nkv * d, nkv * d]
    attn.register_forward_hook(_all_reduce)


def _shard_mlp(mlp: nn.Module, rank: Rank) -> None:
    gate_up, down = mlp.gate_up_proj, mlp.down_proj
    cols = split_evenly(down.in_features, rank.size, rank.index)
    n = len(cols)
    mlp.gate_up_proj = MergedLinear(gate_up.in_features, [n, n], gate_up.bias is not None)
    mlp.gate_up_proj.tp_shard = RowsShard((cols, cols))
    mlp.down_proj = nn.Linear(n, down.out_features, bias=down.bias is not None)
    mlp.down_proj.tp_shard = ColumnsShard(cols, 0, n, rank.index == 0)
    mlp.register_forward_hook(_all_reduce)


def _shard_vocab(model: nn.Module, cfg: ModelConfig, rank: Rank) -> None:
    vocab, padded = vocab_shard(cfg.vocab_size, rank)
    model.model.embed_tokens = VocabParallelEmbedding(vocab, padded, cfg.hidden_size)
    head = model.lm_head
    model.lm_head = nn.Linear(cfg.hidden_size, padded, bias=head.bias is not None)
    model.lm_head.tp_shard = VocabShard(vocab, padded)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.register_forward_hook(_GatherLogits(cfg.vocab_size, rank))


def rank_config(cfg: ModelConfig, rank: Rank) -> ModelConfig:
    """The model config as a rank sees it: its own query and KV head counts, which size its KV
    pool and attention backend."""
    heads = head_shard(cfg.num_heads, cfg.num_kv_heads, rank)
    return replace(cfg, num_heads=len(heads.q_heads), num_kv_heads=len(heads.kv_heads))


def shard_model(model: nn.Module, rank: Rank) -> None:
    """Makes `model` (a Llama-family causal LM, on the meta device) rank `rank`'s shard, in
    place."""
    cfg: ModelConfig = model.config
    heads = head_shard(cfg.num_heads, cfg.num_kv_heads, rank)
    for module in list(model.modules()):
        if hasattr(module, "qkv_proj") and hasattr(module, "o_proj"):
            _shard_attention(module, heads, rank)
        elif hasattr(module, "gate_up_proj") and hasattr(module, "down_proj"):
            _shard_mlp(module, rank)
    _shard_vocab(model, cfg, rank)
