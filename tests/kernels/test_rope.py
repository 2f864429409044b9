from __future__ import annotations

import pytest
import torch

from kernels.rope import apply_rope, apply_rope_ref, llama3_inv_freq_ref, rope_cos_sin

# bf16 rounds once at the end; the interpreter truncates float32 -> bf16 where a GPU rounds to
# nearest, so allow one bf16 ulp (2**-7 relative).
TOLERANCES = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}

# Llama 3.1 8B's rope_scaling, over positions on both sides of the original context
LLAMA3 = dict(
    base=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)
MAX_POSITIONS = 9000


def _inv_freq(kind: str, head_dim: int) -> torch.Tensor:
    if kind == "llama3":
        return llama3_inv_freq_ref(head_dim=head_dim, **LLAMA3)
    return 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("num_tokens", "num_heads", "num_kv_heads", "head_dim", "freqs", "index"),
    [
        (1, 4, 4, 64, "plain", torch.int32),
        (13, 6, 2, 128, "llama3", torch.int64),
        (5, 8, 1, 64, "llama3", torch.int32),
    ],
)
def test_matches_reference(
    device, dtype, num_tokens, num_heads, num_kv_heads, head_dim, freqs, index
):
    gen = torch.Generator().manual_seed(0)
    cos, sin = (t.to(device) for t in rope_cos_sin(_inv_freq(freqs, head_dim), MAX_POSITIONS))
    positions = torch.randint(0, MAX_POSITIONS, (num_tokens,), generator=gen).to(index).to(device)
    # q, k: views into one fused qkv projection, strided along tokens like the executor's
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen)
    qkv = qkv.to(dtype).to(device)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim :][:, : num_kv_heads * head_dim]
    k = k.view(num_tokens, num_kv_heads, head_dim)
    q_ref, k_ref = q.clone(), k.clone()

    out_q, out_k = apply_rope(q, k, positions, cos, sin)
    apply_rope_ref(q_ref, k_ref, positions, cos, sin)

    assert out_q is q and out_k is k
    torch.testing.assert_close(q, q_ref, **TOLERANCES[dtype])
    torch.testing.assert_close(k, k_ref, **TOLERANCES[dtype])


def test_llama3_inv_freq_matches_transformers():
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    from transformers import LlamaConfig

    params = {"rope_type": "llama3", "rope_theta": LLAMA3["base"]}
    params |= {k: v for k, v in LLAMA3.items() if k != "base"}
    config = LlamaConfig(hidden_size=512, num_attention_heads=4, rope_parameters=params)
    expected, _ = rope_utils.ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    torch.testing.assert_close(llama3_inv_freq_ref(head_dim=128, **LLAMA3), expected)


def test_llama3_scaling_keeps_high_and_stretches_low_frequencies():
    scaled = llama3_inv_freq_ref(head_dim=128, **LLAMA3)
    plain = 1.0 / LLAMA3["base"] ** (torch.arange(0, 128, 2).float() / 128)
    assert torch.equal(scaled[:4], plain[:4])
    torch.testing.assert_close(scaled[-4:], plain[-4:] / LLAMA3["factor"])


def _valid_inputs(device: str) -> dict:
    cos, sin = rope_cos_sin(_inv_freq("plain", 64), 16)
    return dict(
        q=torch.randn(3, 4, 64, device=device),
        k=torch.randn(3, 2, 64, device=device),
        positions=torch.tensor([0, 5, 9], device=device),
        cos=cos.to(device),
        sin=sin.to(device),
    )


BAD_INPUTS = {
    "q-2d": lambda a: a.update(q=a["q"][0]),
    "tokens-mismatch": lambda a: a.update(k=a["k"][:2]),
    "head-dim-mismatch": lambda a: a.update(k=a["k"][..., :32].contiguous()),
    "odd-head-dim": lambda a: a.update(q=a["q"][..., :63].contiguous()),
    "table-width": lambda a: a.update(cos=a["cos"][:, :16].contiguous()),
    "float16-table": lambda a: a.update(sin=a["sin"].half()),
    "float-positions": lambda a: a.update(positions=a["positions"].float()),
    "dtype-mismatch": lambda a: a.update(k=a["k"].bfloat16()),
    "strided-head-dim": lambda a: a.update(q=a["q"].transpose(1, 2).contiguous().transpose(1, 2)),
    "other-device": lambda a: a.update(positions=a["positions"].to("meta")),
}


@pytest.mark.parametrize("corrupt", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_rejects_bad_inputs(device, corrupt):
    args = _valid_inputs(device)
    corrupt(args)
    with pytest.raises(ValueError):
        apply_rope(**args)
