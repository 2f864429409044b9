"""Building a model and filling it from Hugging Face safetensors.

Renames live here, not in the model files: HF's q/k/v and gate/up weights are copied into the
model's stacked `qkv_proj` / `gate_up_proj` at the offsets their `MergedLinear` declares. Under
tensor parallelism (parallel.py) a layer's `tp_shard` first cuts the rank's part out of each
checkpoint tensor. Quantization is applied after loading (quantization.py), or the linear weights
come quantized from a GGUF file (gguf_weights.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from services.executor.layers import MergedLinear, RotaryEmbedding
from services.executor.model_config import ModelConfig
from services.executor.models import model_class
from services.executor.packed_linear import prepack_linears
from services.executor.parallel import Rank, shard_model
from services.executor.quantization import Quantization, quantize_linears, traceable_quantized

log = logging.getLogger("radixserve.executor")
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    return files


def iter_safetensors(path: Path, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    for file in tqdm(safetensors_files(path), desc="loading weights", disable=not progress):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118  (safe_open is not a dict)
                yield name, handle.get_tensor(name)


def build_model(
    cfg: ModelConfig,
    max_positions: int,
    dtype: torch.dtype,
    device: torch.device,
    rank: Rank | None = None,
) -> nn.Module:
    """An uninitialised model of the config's architecture (weights to be loaded); with `rank`,
    that tensor-parallel rank's shard of it."""
    with torch.device("meta"):
        model = model_class(cfg.architecture)(cfg, max_positions)
        if rank is not None:
            shard_model(model, rank)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.init_table(device)
    return model.eval()


def checkpoint_target(name: str, packed: dict[str, list[str]]) -> tuple[str, int | None]:
    """Model parameter name and stacked-shard index for an HF weight name."""
    for fused, parts in packed.items():
        for index, part in enumerate(parts):
            if f".{part}." in name:
                return name.replace(f".{part}.", f".{fused}."), index
    return name, None


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copies HF-named tensors into `model`; raises when a weight is missing or misshapen."""
    params = dict(model.named_parameters())
    packed = getattr(model, "packed_modules", {})
    tied = model.config.tie_word_embeddings
    pending = {n: len(_shards_of(model, n)) for n in params}
    for name, tensor in weights:
        if name.endswith(SKIPPED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        target, shard = checkpoint_target(name, packed)
        if target not in params:
            raise KeyError(f"checkpoint weight {name!r} has no place in {type(model).__name__}")
        _copy(model, params[target], target, shard, tensor)
        pending[target] -= 1
    missing = [n for n, left in pending.items() if left > 0]
    if missing:
        raise KeyError(
            f"checkpoint lacks weights for {missing[:5]}{'…' if len(missing) > 5 else ''}"
        )


def _shards_of(model: nn.Module, param_name: str) -> list[int]:
    module = model.get_submodule(param_name.rsplit(".", 1)[0])
    return list(range(len(module.output_sizes))) if isinstance(module, MergedLinear) else [0]


def _copy(
    model: nn.Module, param: torch.Tensor, name: str, shard: int | None, tensor: torch.Tensor
) -> None:
    dest = param.data
    module = model.get_submodule(name.rsplit(".", 1)[0])
    tp_shard = getattr(module, "tp_shard", None)
    if tp_shard is not None:
        tensor = tp_shard.local(tensor, shard, name.endswith(".bias"))
    if shard is not None:
        offset, size = module.shard_offset(shard)
        dest = dest.narrow(0, offset, size)
    if dest.shape != tensor.shape:
        raise ValueError(
            f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(dest.shape)}"
        )
    with torch.no_grad():
        dest.copy_(tensor)


def load_model(
    path: Path,
    cfg: ModelConfig,
    max_positions: int,
    dtype: torch.dtype,
    device: torch.device,
    prepack: bool = True,
    rank: Rank | None = None,
    quantization: Quantization | None = None,
) -> nn.Module:
    """Builds the model (with `rank`, that tensor-parallel rank's shard) and loads its weights;
    with `quantization`, its linear layers are quantized (int8, int4) or read quantized from a
    GGUF file (gguf; see quantization.py, gguf_weights.py); with `prepack`, the linear weights
    left float are packed for oneDNN where that is faster (bfloat16 and float32 on a CPU whose
    torch has oneDNN, see packed_linear.py); without it (torch.compile), quantized layers take
    torch's layouts (`traceable_quantized`). Raises ValueError for quantization under tensor
    parallelism."""
    quant = quantization or Quantization()
    if quant.method != "none" and rank is not None:
        raise ValueError("--quantization does not support --tp above 1")
    model = build_model(cfg, max_positions, dtype, device, rank)
    if quant.method == "gguf":
        from services.executor.gguf_weights import load_gguf  # imports this module

        assert quant.gguf_path is not None, "--quantization gguf needs the GGUF file"
        load_gguf(model, quant.gguf_path)
    else:
        load_weights(model, iter_safetensors(path))
    if quant.method in ("int8", "int4"):
        quantize_linears(model, quant.method, quant.group_size)
    if prepack:
        prepack_linears(model)
    else:  # torch.compile: quantized layers on torch's kernels
        traceable_quantized(model)
    source = quant.gguf_path if quant.method == "gguf" else path
    log.info("loaded %s (%s, %s, quantization %s)", source, cfg.architecture, dtype, quant.label)
    return model
