"""A GGUF file's own quantized weights, loaded as they are (`--quantization gguf`).

The model is built from the Hugging Face directory converted from the same file (config and
tokenizer); its linear layers are then filled straight from the GGUF's blocks:

- Q4_0 and Q4_1 map exactly onto `Int4Linear` with groups of 32 (a GGUF block is 32 weights
  along the input dimension): Q4_0 (w = d * (q - 8)) is scale d, zero 0; Q4_1 (w = d * q + m) is
  scale d, zero m + 8 d, since (q - 8) * d + (m + 8 d) = d * q + m. The fp16 d and m become the
  model dtype (exact in float32; rounded to 8 significant bits in bfloat16).
- Every other quantized type (Q8_0, the K-quants, ...) has no exact twin among the kernels: its
  rows are expanded by the gguf package and requantized to per-output-channel int8
  (`Int8Linear`). For Q8_0 (a scale per 32 weights) that adds an error of at most half the
  row's int8 step per weight.
- A layer whose parts (q|k|v, gate|up) mix Q4 and other types goes to int8 the same way; one with
  a float part (F32, F16, BF16), or a shape the kernels cannot run, stays float.
- Tensors of other modules (norms, the embedding table, which is only gathered from) load as
  float through `weights.load_weights`; a quantized embedding is expanded for that.

A tied LM head reads the embedding's tensor (`token_embd`): the head gets it quantized as above,
the embedding a float copy. llama.cpp's converter permutes the rows of q_proj and k_proj of
`llama` models for its RoPE layout; they are permuted back here as transformers does when it
reads a GGUF (whole rows move, so the blocks along the input dimension stay intact).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize
from torch import nn

from services.executor.packed_linear import children_of_type
from services.executor.quantization import (
    QUANTIZED_LINEARS,
    Int4Linear,
    Int8Linear,
    check_quantizable,
    int4_fallback_reason,
    int8_fallback_reason,
)
from services.executor.weights import checkpoint_target, load_weights

log = logging.getLogger("radixserve.executor")

FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
Q4_TYPES = (Q.Q4_0, Q.Q4_1)
Q4_BLOCK = 32  # weights per Q4_0 / Q4_1 block, along the input dimension
IGNORED = ("rope_freqs.weight",)  # llama3 RoPE factors: the model computes them from config.json
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name of a Hugging Face tensor name (`model.layers.3.self_attn.q_proj.weight`
    → `blk.3.attn_q.weight`); names it does not know come back unchanged."""
    module, kind = hf_name.rsplit(".", 1)
    if module in TOP_NAMES:
        return f"{TOP_NAMES[module]}.{kind}"
    parts = module.split(".", 3)  # model, layers, N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in LAYER_NAMES:
        return f"blk.{parts[2]}.{LAYER_NAMES[parts[3]]}.{kind}"
    return hf_name


def hf_name(name: str) -> str:
    """The Hugging Face name of a llama.cpp tensor name (the inverse of `gguf_name`)."""
    module, kind = name.rsplit(".", 1)
    for hf, gg in TOP_NAMES.items():
        if module == gg:
            return f"{hf}.{kind}"
    parts = module.split(".", 2)  # blk, N, rest
    for hf, gg in LAYER_NAMES.items():
        if len(parts) == 3 and parts[0] == "blk" and parts[2] == gg:
            return f"model.layers.{parts[1]}.{hf}.{kind}"
    return name


def unpermute_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undoes llama.cpp's RoPE permutation of q_proj / k_proj rows (transformers'
    `reverse_permute_weights`): rows [N, ...] with N = n_head * 2 * d; row h*2d + a*d + b of
    the result is row h*2d + 2b + a of `rows`."""
    n = rows.shape[0]
    perm = torch.arange(n).view(n_head, n // n_head // 2, 2).transpose(1, 2).reshape(-1)
    return rows[perm]


def decode_q4(raw: torch.Tensor, qtype: Q) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 blocks as torch's int4 convention, w = (q - 8) * scale + zero.

    raw: [N, K/32 * block_bytes] uint8, each block fp16 d (Q4_1: then fp16 m) and 16 bytes whose
    low nibbles are weights 0..15 of the block and high nibbles weights 16..31.
    Returns q [N, K] uint8 in [0, 15], scale and zero [N, K/32] float32 (exact)."""
    n = raw.shape[0]
    head = 2 if qtype == Q.Q4_0 else 4
    blocks = raw.reshape(n, -1, head + 16)
    d = blocks[..., 0:2].contiguous().view(torch.float16).float().squeeze(-1)
    if qtype == Q.Q4_0:
        zero = torch.zeros_like(d)
    elif qtype == Q.Q4_1:
        m = blocks[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1)
        zero = m + 8 * d
    else:
        raise ValueError(f"not a Q4 type: {qtype!r}")
    nibbles = blocks[..., head:]
    q = torch.cat([nibbles & 15, nibbles >> 4], dim=-1)  # [N, K/32, 32]
    return q.reshape(n, -1), d, zero


class GGUFTensors:
    """The tensors of one GGUF file by name, with the row un-permutation its architecture needs
    (`num_heads`, `num_kv_heads`: the model's, for q_proj / k_proj)."""

    def __init__(self, path: Path, num_heads: int, num_kv_heads: int) -> None:
        reader = GGUFReader(path)
        field = reader.fields["general.architecture"]
        self.arch = bytes(field.parts[field.data[0]]).decode()
        self.tensors: dict[str, ReaderTensor] = {t.name: t for t in reader.tensors}
        self.heads = {"attn_q": num_heads, "attn_k": num_kv_heads}

    def get(self, name: str) -> ReaderTensor | None:
        return self.tensors.get(name)

    def _rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        kind = name.split(".")[-2]
        if self.arch == "llama" and kind in self.heads:
            return unpermute_rows(rows, self.heads[kind])
        return rows

    def float(self, name: str) -> torch.Tensor:
        """A tensor expanded to float32 by the gguf package, rows un-permuted ([N, K] or [N])."""
        t = self.tensors[name]
        return self._rows(name, torch.from_numpy(dequantize(t.data, t.tensor_type).copy()))

    def int4(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A Q4_0 / Q4_1 tensor as (q, scale, zero), see `decode_q4`, rows un-permuted."""
        t = self.tensors[name]
        raw = torch.from_numpy(np.array(t.data, dtype=np.uint8))
        return tuple(self._rows(name, x) for x in decode_q4(raw, t.tensor_type))  # type: ignore[return-value]


def load_gguf(model: nn.Module, path: Path) -> list[str]:
    """Fills a built `model` from the GGUF file at `path`: its quantized linear weights as
    `Int4Linear` / `Int8Linear` (see the module docstring), everything else as float.
    Returns the names of the linear layers left float. Raises KeyError or ValueError when a
    tensor is missing, has no place in the model or does not fit its shape."""
    first = next(model.parameters())
    check_quantizable(first.dtype, first.device)
    cfg = model.config
    gguf = GGUFTensors(path, cfg.num_heads, cfg.num_kv_heads)
    kept = _install_quantized(model, gguf, first.dtype, first.device)
    load_weights(model, _float_tensors(model, gguf))
    return kept


def _linear_slots(model: nn.Module) -> Iterator[tuple[nn.Module, str, str, list[str]]]:
    """(parent, attribute, full name, Hugging Face names of its stacked parts) per linear."""
    packed = getattr(model, "packed_modules", {})
    for parent, name, full, _ in children_of_type(model, nn.Linear):
        prefix = full.rpartition(".")[0]
        parts = [f"{prefix}.{p}" for p in packed[name]] if name in packed else [full]
        yield parent, name, full, parts


def _install_quantized(
    model: nn.Module, gguf: GGUFTensors, dtype: torch.dtype, device: torch.device
) -> list[str]:
    kept, counts = [], {"int4": 0, "int8": 0}
    tied_head = gguf.get("output.weight") is None
    for parent, attr, full, parts in _linear_slots(model):
        names = [gguf_name(f"{p}.weight") for p in parts]
        if full == "lm_head" and tied_head:
            names = ["token_embd.weight"]
        linear = getattr(parent, attr)
        twin = _quantized(gguf, names, _bias(gguf, parts, linear), dtype, device)
        if isinstance(twin, str):
            log.warning("%s stays %s: %s", full, dtype, twin)
            kept.append(full)
            continue
        if (twin.out_features, twin.in_features) != (linear.out_features, linear.in_features):
            raise ValueError(
                f"{full}: GGUF weight {twin.out_features}x{twin.in_features} != model "
                f"{linear.out_features}x{linear.in_features}"
            )
        setattr(parent, attr, twin)
        counts["int4" if isinstance(twin, Int4Linear) else "int8"] += 1
    log.info(
        "GGUF weights: %d linear layers int4 (Q4 blocks), %d int8, %d float",
        counts["int4"],
        counts["int8"],
        len(kept),
    )
    return kept


def _bias(gguf: GGUFTensors, parts: list[str], linear: nn.Linear) -> torch.Tensor | None:
    if linear.bias is None:
        return None
    return torch.cat([gguf.float(gguf_name(f"{p}.bias")) for p in parts])


def _quantized(
    gguf: GGUFTensors,
    names: list[str],
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
) -> nn.Module | str:
    """The quantized layer of the GGUF tensors `names` stacked by rows, built on `device`, or
    why it stays float."""
    tensors = [gguf.get(n) for n in names]
    missing = [n for n, t in zip(names, tensors, strict=True) if t is None]
    if missing:
        raise KeyError(f"GGUF file lacks {missing}")
    types = {t.tensor_type for t in tensors}  # type: ignore[union-attr]
    if types & set(FLOAT_TYPES):
        return f"float tensor in the GGUF ({', '.join(sorted(t.name for t in types))})"
    if types <= set(Q4_TYPES):
        blocks = [gguf.int4(n) for n in names]  # (q, scale, zero) per part, stacked by rows
        q, scale, zero = (torch.cat([b[i] for b in blocks]).to(device) for i in range(3))
        if int4_fallback_reason(q.shape[0], q.shape[1], Q4_BLOCK) is None:
            bias = None if bias is None else bias.to(device)
            return Int4Linear(q, scale.to(dtype), zero.to(dtype), Q4_BLOCK, bias)
    weight = torch.cat([gguf.float(n) for n in names]).to(device)
    reason = int8_fallback_reason(*weight.shape)
    return reason or Int8Linear.from_float(weight, None if bias is None else bias.to(device), dtype)


def _float_tensors(model: nn.Module, gguf: GGUFTensors) -> Iterator[tuple[str, torch.Tensor]]:
    """Hugging Face name and float32 value of every tensor not already in a quantized layer."""
    packed = getattr(model, "packed_modules", {})
    for name in gguf.tensors:
        if name in IGNORED:
            continue
        hf = hf_name(name)
        target, _ = checkpoint_target(hf, packed)
        try:
            module = model.get_submodule(target.rsplit(".", 1)[0])
        except AttributeError:
            module = None  # no place in the model: load_weights says so
        if not isinstance(module, QUANTIZED_LINEARS):
            yield hf, gguf.float(name)
