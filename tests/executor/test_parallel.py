"""Tensor-parallel sharding: how heads, MLP columns and the vocabulary split over ranks, the shapes
and weights each rank's model gets, and sharded forwards (ranks as threads) against the whole
model."""

from __future__ import annotations

import pytest
import torch
import transformers
from hypothesis import given
from hypothesis import strategies as st

from services.executor.engine import Engine, EngineLimits
from services.executor.model_config import ModelConfig
from services.executor.parallel import (
    HeadShard,
    Rank,
    head_shard,
    kv_heads_per_rank,
    rank_config,
    split_evenly,
    vocab_shard,
)
from services.executor.sampling_params import SamplingParams
from services.executor.step import NewRequest, Slice, SlotWrite, StepInput
from services.executor.weights import build_model, load_weights
from tests.executor.tiny import BASE, engine_for, hf_model
from tests.executor.tp_threads import run_ranks

CPU = torch.device("cpu")


def test_split_evenly_gives_the_first_parts_the_remainder() -> None:
    assert [split_evenly(10, 3, i) for i in range(3)] == [range(0, 4), range(4, 7), range(7, 10)]
    assert [split_evenly(1536, 3, i) for i in range(3)] == [
        range(0, 512),
        range(512, 1024),
        range(1024, 1536),
    ]
    assert [split_evenly(2, 3, i) for i in range(3)] == [range(0, 1), range(1, 2), range(2, 2)]


def shards(heads: int, kv: int, size: int) -> list[HeadShard]:
    return [head_shard(heads, kv, Rank(r, size)) for r in range(size)]


@pytest.mark.parametrize(
    ("heads", "kv", "size", "expected"),
    [
        # KV heads divide: each rank its own groups, nothing replicated
        (4, 2, 2, [((0, 2), (0, 2), (0, 1)), ((2, 4), (2, 4), (1, 2))]),
        # SmolLM2-135M on 3 ranks: 3 query heads and 1 KV head each
        (9, 3, 3, [((0, 3), (0, 3), (0, 1)), ((3, 6), (3, 6), (1, 2)), ((6, 9), (6, 9), (2, 3))]),
        # more ranks than KV heads: each KV head on the two ranks reading it
        (
            8,
            2,
            4,
            [
                ((0, 2), (0, 2), (0, 1)),
                ((2, 4), (2, 4), (0, 1)),
                ((4, 6), (4, 6), (1, 2)),
                ((6, 8), (6, 8), (1, 2)),
            ],
        ),
        # 3 KV heads on 2 ranks: the middle one on both; whole groups computed, 3 heads owned
        (6, 3, 2, [((0, 4), (0, 3), (0, 2)), ((2, 6), (3, 6), (1, 3))]),
        # SmolLM2-135M on 2 ranks: 5 and 4 query heads owned, 6 computed each
        (9, 3, 2, [((0, 6), (0, 5), (0, 2)), ((3, 9), (5, 9), (1, 3))]),
    ],
)
def test_head_shards(heads: int, kv: int, size: int, expected: list) -> None:
    got = [
        (
            (s.q_heads.start, s.q_heads.stop),
            (s.owned.start, s.owned.stop),
            (s.kv_heads.start, s.kv_heads.stop),
        )
        for s in shards(heads, kv, size)
    ]
    assert got == expected


def test_kv_heads_replicated_where_the_ranks_do_not_divide_them() -> None:
    assert kv_heads_per_rank(9, 3, 3) == [1, 1, 1]  # divides: 3 heads in all
    assert kv_heads_per_rank(9, 3, 2) == [2, 2]  # the middle head on both ranks
    assert kv_heads_per_rank(8, 2, 4) == [1, 1, 1, 1]  # each head on two ranks


def test_more_ranks_than_heads_is_refused() -> None:
    with pytest.raises(ValueError, match="--tp 4 exceeds the model's 3 attention heads"):
        head_shard(3, 1, Rank(0, 4))


@given(
    kv=st.integers(1, 8),
    group=st.integers(1, 6),
    size=st.integers(1, 12),
)
def test_head_shards_cover_every_head_once_with_a_uniform_group(
    kv: int, group: int, size: int
) -> None:
    heads = kv * group
    if size > heads:
        return
    owned: list[int] = []
    for s in shards(heads, kv, size):
        owned += list(s.owned)
        assert s.q_heads.start <= s.owned.start and s.owned.stop <= s.q_heads.stop
        assert len(s.q_heads) % len(s.kv_heads) == 0
        local_group = len(s.q_heads) // len(s.kv_heads)
        # what the attention backends assume: local query head i reads local KV head i // group
        for i, q in enumerate(s.q_heads):
            assert q // group == s.kv_heads[i // local_group]
    assert owned == list(range(heads))


def test_vocab_shards_are_equal_padded_blocks() -> None:
    assert [vocab_shard(49152, Rank(r, 3)) for r in range(3)] == [
        (range(0, 16384), 16384),
        (range(16384, 32768), 16384),
        (range(32768, 49152), 16384),
    ]
    assert [vocab_shard(256, Rank(r, 3)) for r in range(3)] == [
        (range(0, 86), 86),
        (range(86, 172), 86),
        (range(172, 256), 86),
    ]


def config_for(**overrides: object) -> tuple[transformers.PreTrainedModel, ModelConfig]:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**BASE, **overrides})
    hf = transformers.LlamaForCausalLM(config).float().eval()
    return hf, ModelConfig.from_dict(hf.config.to_dict())


def sharded(hf: transformers.PreTrainedModel, cfg: ModelConfig, rank: Rank) -> torch.nn.Module:
    model = build_model(cfg, 128, torch.float32, CPU, rank)
    load_weights(model, hf.state_dict().items())
    return model


def test_shapes_and_weights_of_each_rank() -> None:
    # 6 query heads of dim 16 over 3 KV heads, on 2 ranks: rank 1 computes heads 2..5, owns 3..5
    hf, cfg = config_for(hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    full = hf.state_dict()
    d, hidden = 16, 96
    model = sharded(hf, cfg, Rank(1, 2))
    attn = model.model.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads) == (4, 2)
    assert attn.qkv_proj.weight.shape == ((4 + 2 + 2) * d, hidden)
    q, k, v = attn.qkv_proj.weight.split([4 * d, 2 * d, 2 * d])
    prefix = "model.layers.0.self_attn"
    assert torch.equal(q, full[f"{prefix}.q_proj.weight"][2 * d : 6 * d])
    assert torch.equal(k, full[f"{prefix}.k_proj.weight"][1 * d : 3 * d])
    assert torch.equal(v, full[f"{prefix}.v_proj.weight"][1 * d : 3 * d])
    o = attn.o_proj.weight
    assert o.shape == (hidden, 4 * d)
    assert torch.equal(o[:, :d], torch.zeros(hidden, d))  # head 2: computed, owned by rank 0
    assert torch.equal(o[:, d:], full[f"{prefix}.o_proj.weight"][:, 3 * d :])
    mlp = model.model.layers[0].mlp
    assert mlp.gate_up_proj.weight.shape == (2 * 64, hidden)  # intermediate 128 over 2 ranks
    gate, up = mlp.gate_up_proj.weight.split(64)
    assert torch.equal(gate, full["model.layers.0.mlp.gate_proj.weight"][64:])
    assert torch.equal(up, full["model.layers.0.mlp.up_proj.weight"][64:])
    assert torch.equal(mlp.down_proj.weight, full["model.layers.0.mlp.down_proj.weight"][:, 64:])
    embed = model.model.embed_tokens.weight
    assert embed.shape == (128, hidden) and torch.equal(
        embed, full["model.embed_tokens.weight"][128:]
    )
    assert model.lm_head.weight is embed  # still tied
    assert rank_config(cfg, Rank(1, 2)).num_kv_heads == 2


def test_untied_head_and_padding_rows() -> None:
    hf, cfg = config_for(tie_word_embeddings=False)
    full = hf.state_dict()
    model = sharded(hf, cfg, Rank(2, 3))  # vocab 256 on 3 ranks: 86 rows, the last 84 real
    head = model.lm_head.weight
    assert head.shape == (86, 64) and head is not model.model.embed_tokens.weight
    assert torch.equal(head[:84], full["lm_head.weight"][172:])
    assert torch.equal(head[84:], torch.zeros(2, 64))


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100, 3, 3, 3, 200, 1], [1, 2], [250, 17, 17]]
GREEDY = SamplingParams(temperature=0)


def steps() -> list[StepInput]:
    """A prefill of every prompt, then two mixed steps (a decode per row plus one more token)."""
    out = [
        StepInput(
            1,
            add=[NewRequest(r, f"r{r}", GREEDY, p) for r, p in enumerate(PROMPTS)],
            writes=[SlotWrite(r, 0, list(range(1 + 40 * r, 31 + 40 * r))) for r in range(4)],
            slices=[Slice(r, 0, p) for r, p in enumerate(PROMPTS)],
        )
    ]
    for k in range(2):
        slices = [Slice(r, len(p) + k, [(7 * r + k) % 256]) for r, p in enumerate(PROMPTS)]
        out.append(StepInput(2 + k, slices=slices))
    return out


@pytest.mark.parametrize(
    ("variant", "overrides", "size"),
    [
        ("llama", {}, 2),  # heads divide
        ("qwen2", {}, 2),  # q/k/v biases, untied head
        ("gqa3", {"hidden_size": 192, "num_attention_heads": 3, "num_key_value_heads": 1}, 3),
        ("3kv-on-2", {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 3}, 2),
        ("9q3kv-on-2", {"hidden_size": 144, "num_attention_heads": 9, "num_key_value_heads": 3}, 2),
        ("9q3kv-on-4", {"hidden_size": 144, "num_attention_heads": 9, "num_key_value_heads": 3}, 4),
    ],
)
def test_sharded_logits_match_the_whole_model(
    monkeypatch: pytest.MonkeyPatch, variant: str, overrides: dict, size: int
) -> None:
    hf = hf_model("qwen2") if variant == "qwen2" else config_for(**overrides)[0]
    cfg = ModelConfig.from_dict(hf.config.to_dict())
    whole = engine_for(hf, num_slots=256, max_rows=8)
    expected = [whole.logits(s) for s in steps()]

    def rank_logits(rank: Rank) -> list[torch.Tensor]:
        limits = EngineLimits(256, 8, 128)
        engine = Engine(sharded(hf, cfg, rank), rank_config(cfg, rank), limits, CPU)
        return [engine.logits(s) for s in steps()]

    got = run_ranks(monkeypatch, size, rank_logits)[0]
    for k, (ours, ref) in enumerate(zip(got, expected, strict=True)):
        assert ours.shape == ref.shape == (len(PROMPTS), cfg.vocab_size)
        delta = (ours - ref).abs().max().item()
        assert delta < 1e-5, f"{variant} on {size} ranks, step {k}: max |Δ| {delta:.2e}"


def test_a_rank_holding_half_the_kv_heads_holds_twice_the_slots_in_its_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The KV pool is sized on a rank's own KV heads: on GPUs, each with its own memory, --tp 2
    holds twice the tokens of --tp 1 in the same memory per device; a CPU's ranks share one RAM,
    so there the total stays the same."""
    from services.executor import factory
    from services.executor.config import ExecutorConfig

    _, cfg = config_for()  # 4 query heads, 2 KV heads
    monkeypatch.setattr(factory, "available_memory", lambda device: 64 * 2**20)
    exe = ExecutorConfig(mem_fraction_static=0.5, max_running_requests=10**6)
    half = rank_config(cfg, Rank(0, 2))
    assert (cfg.num_kv_heads, half.num_kv_heads) == (2, 1)
    for device in (torch.device("cpu"), torch.device("cuda")):
        whole = factory.size_kv_pool(exe, cfg, torch.float32, device, 512)
        sharing = 2 if device.type == "cpu" else 1
        split = factory.size_kv_pool(exe, half, torch.float32, device, 512, sharing)
        assert split == (whole if device.type == "cpu" else 2 * whole), device
