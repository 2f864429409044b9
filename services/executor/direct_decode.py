"""Decode steps of Llama-family models on the CPU as one flat loop of direct kernel calls.

At decode batch sizes a step's arithmetic is small, and the Python around it is not: SmolLM2-135M
makes about 270 kernel calls a step (121 linear layers, 61 norms, 30 each of RoPE, attention and
SiLU-and-mul), and each passes through `nn.Module.__call__`, attribute lookups of submodules,
parameters and buffers, and the checks of its kernel wrapper, which reads the environment every
call. Measured on a 2-core AVX2 host with every kernel replaced by a cached result, that is about
7 ms of a 19 ms int8 decode step at one row.

`DirectDecode` resolves, once per row count, the call each module's forward would make for that
many rows (`direct()` of the linear layers: the same kernel with the same bound weights, or the
module's own forward where there is no single call), and runs a step as a loop over those calls,
checking the kernels' switch and the attention inputs once per step. Every kernel receives the
arguments the module path gives it, so the logits are bit for bit the same (tests compare them).

It runs a batch when all of these hold, and the engine runs the modules otherwise:
- the model is a `LlamaForCausalLM` (or a subclass: Qwen2, Mistral) on the CPU, made of the layers
  it knows (plain, packed, small-batch, int8 and int4 linears; `nn.Embedding`; `RMSNorm`);
- every slice of the batch is a decode, and no shared-prefix spans are attached or they run as
  decode groups (`KernelCascadeDecode`, one call per layer: the AMX attention kernel, or the
  AVX2 decode kernel's grouped form);
- the attention backend is "torch" with its C++ decode kernel in use (not batch-invariant, no
  sliding window), and the attention kernels take the KV pool's dtype under the activation
  dtype (the same, bfloat16 under float32 or float8 e5m2 under either: `--kv-cache-dtype`);
- the C++ kernels are enabled (RADIXSERVE_DISABLE_CPU_KERNELS unset) and built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels.cpu as cpu_kernels
from kernels.cpu import fused
from kernels.kv_cache_dtype import store_rows
from services.executor.attention import AttentionBackend
from services.executor.attention.torch_backend import (
    KernelCascadeDecode,
    KernelDecode,
    TorchAttention,
)
from services.executor.forward_batch import ForwardBatch
from services.executor.layers import MergedLinear, RMSNorm, RotaryEmbedding
from services.executor.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
)
from services.executor.packed_linear import FLOAT_LINEARS, Linear2D
from services.executor.quantization import Int4Linear, Int8Linear

# Linear layers whose forward is a pure function of a 2-D input (`direct()` where they have it).
KNOWN_LINEARS = (*FLOAT_LINEARS, MergedLinear, Int8Linear, Int4Linear)


def linear_call(module: nn.Module, x: torch.Tensor) -> Linear2D:
    """The call `module` makes for a 2-D input like `x`: its `direct()` where it has one for that
    input, else its forward (without `nn.Module.__call__`)."""
    direct = getattr(module, "direct", None)
    call = direct(x) if direct is not None else None
    return call if call is not None else module.forward


@dataclass(frozen=True)
class LayerCalls:
    """One decoder layer's calls for a given row count."""

    input_norm: torch.Tensor  # [hidden] RMSNorm weights, in the activation dtype
    post_norm: torch.Tensor
    input_eps: float
    post_eps: float
    qkv: Linear2D
    o_proj: Linear2D
    gate_up: Linear2D
    down: Linear2D


class DirectDecode:
    """Runs pure-decode batches of `model` through direct kernel calls (see the module doc).

    `can_run(batch)` says whether a batch (with `attn.init_metadata` applied) qualifies;
    `run(batch)` returns the logits [num_sampled, vocab] float32 that `model(batch, attn)` would.
    The calls hold the layers' weight tensors: the executor loads the weights before the engine
    starts and never reassigns them, and forward hooks are looked for once, at start-up.
    """

    def __init__(self, model: nn.Module, attn: AttentionBackend) -> None:
        self.attn = attn
        inner = model.model  # type: ignore[union-attr]
        self.layers = list(inner.layers)
        self.embed: nn.Embedding = inner.embed_tokens
        self.norm: RMSNorm = inner.norm
        self.lm_head: nn.Module = model.lm_head  # type: ignore[assignment]
        self.rope = inner.rotary_emb
        first = self.layers[0].self_attn
        self.num_heads, self.num_kv_heads = first.num_heads, first.num_kv_heads
        self.head_dim = first.head_dim
        self.v_start = first.split[0] + first.split[1]
        self.dtype = self.embed.weight.dtype
        self._probe = torch.empty(0, dtype=self.dtype)  # what `fused.available` is asked about
        self._calls: dict[int, tuple[list[LayerCalls], Linear2D]] = {}

    @staticmethod
    def supports(model: nn.Module, attn: AttentionBackend, device: torch.device) -> bool:
        """Whether `model` and `attn` are ones this runner knows (checked once, at start-up)."""
        if device.type != "cpu" or not isinstance(model, LlamaForCausalLM):
            return False
        if not isinstance(attn, TorchAttention) or not attn.use_cpu_kernel:
            return False
        inner = model.model
        # The Llama block exactly: a subclass could change what a layer computes.
        if type(model).forward is not LlamaForCausalLM.forward or type(inner) is not LlamaModel:
            return False
        if type(inner.embed_tokens) is not nn.Embedding or not inner.layers:
            return False
        if type(inner.rotary_emb) is not RotaryEmbedding or not all(
            type(layer) is LlamaDecoderLayer
            and type(layer.self_attn) is LlamaAttention
            and type(layer.mlp) is LlamaMLP
            for layer in inner.layers
        ):
            return False
        dtype = inner.embed_tokens.weight.dtype
        if not cpu_kernels.supports_dtypes(dtype, attn.pool.k[0].dtype):
            return False
        norms = [inner.norm]
        linears: list[nn.Module] = [model.lm_head]
        for layer in inner.layers:
            norms += [layer.input_layernorm, layer.post_attention_layernorm]
            linears += [layer.self_attn.qkv_proj, layer.self_attn.o_proj]
            linears += [layer.mlp.gate_up_proj, layer.mlp.down_proj]
        if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
            return False  # tensor parallelism adds its all-reduces as hooks
        return all(type(n) is RMSNorm and n.weight.dtype == dtype for n in norms) and all(
            type(m) in KNOWN_LINEARS for m in linears
        )

    def can_run(self, batch: ForwardBatch) -> bool:
        """A pure-decode batch without shared spans (or with them as decode groups), whose
        attention metadata is the C++ kernels', with the C++ kernels enabled and built."""
        decode = getattr(batch.attn_metadata, "decode", None)
        return (
            batch.num_extend == 0
            and (batch.shared is None or isinstance(decode, KernelCascadeDecode))
            and not self.attn.batch_invariant  # type: ignore[attr-defined]
            and isinstance(decode, KernelDecode)
            and fused.available(self._probe) is not None  # None when the kernels are disabled
        )

    def _calls_for(self, rows: int) -> tuple[list[LayerCalls], Linear2D]:
        """Each layer's calls for an input of `rows` rows, and the LM head's for `rows` rows (the
        usual case: every row sampled); built on first use."""
        if rows not in self._calls:
            hidden = self.embed.weight.shape[1]
            x = torch.empty(rows, hidden, dtype=self.dtype)
            attn_in = torch.empty(rows, self.num_heads * self.head_dim, dtype=self.dtype)
            layers = []
            for layer in self.layers:
                mlp, sa = layer.mlp, layer.self_attn
                inter = torch.empty(rows, mlp.down_proj.in_features, dtype=self.dtype)
                layers.append(
                    LayerCalls(
                        layer.input_layernorm.weight.detach(),
                        layer.post_attention_layernorm.weight.detach(),
                        layer.input_layernorm.eps,
                        layer.post_attention_layernorm.eps,
                        linear_call(sa.qkv_proj, x),
                        linear_call(sa.o_proj, attn_in),
                        linear_call(mlp.gate_up_proj, x),
                        linear_call(mlp.down_proj, inter),
                    )
                )
            self._calls[rows] = (layers, linear_call(self.lm_head, x))
        return self._calls[rows]

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [num_sampled, vocab] float32 of a batch `can_run` accepted."""
        kernel = fused.available(self._probe)
        assert kernel is not None, "can_run checks the fused kernels"
        attention = cpu_kernels.load()
        assert attention is not None, "the backend uses the decode kernel"
        rows = batch.num_tokens
        layers, lm_head = self._calls_for(rows)
        part: KernelDecode = batch.attn_metadata.decode  # type: ignore[union-attr]
        k_pools, v_pools, table = self.attn.pool.k, self.attn.pool.v, self.attn.table.table
        positions, loc = batch.positions, batch.out_cache_loc
        cos, sin = self.rope.cos, self.rope.sin
        heads, kv_heads, dim, v_start = (
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.v_start,
        )
        scale = self.attn.scale
        fused_store = k_pools[0].dtype == self.dtype
        cascade = isinstance(part, KernelCascadeDecode)  # groups sharing prefixes (AMX, AVX2)
        x, residual = F.embedding(batch.input_ids, self.embed.weight), None
        for i, calls in enumerate(layers):
            if residual is None:
                residual, x = x, kernel.add_rmsnorm(x, None, calls.input_norm, calls.input_eps)[0]
            else:
                x, residual = kernel.add_rmsnorm(x, residual, calls.input_norm, calls.input_eps)
            qkv = calls.qkv(x)
            if fused_store:
                q = kernel.rope_store(
                    qkv, positions, cos, sin, heads, kv_heads, dim, k_pools[i], v_pools[i], loc
                )
            else:  # --kv-cache-dtype narrower than the model: rounded as they are stored
                q, k = kernel.rope(qkv, positions, cos, sin, heads, kv_heads, dim)
                v = qkv[:, v_start:].view(-1, kv_heads, dim)
                store_rows(k_pools[i], loc, k)
                store_rows(v_pools[i], loc, v)
            if i == 0:
                cpu_kernels.check_decode_args(
                    q, k_pools[0], v_pools[0], table, part.rows, part.seq_lens
                )
            if cascade:
                out = self.attn.cascade_decode(  # type: ignore[attr-defined]
                    q, k_pools[i], v_pools[i], part
                )
            else:
                out = attention.paged_decode_attention(
                    q, k_pools[i], v_pools[i], table, part.rows, part.seq_lens, scale
                )
            x = calls.o_proj(out.view(rows, heads * dim))
            x, residual = kernel.add_rmsnorm(x, residual, calls.post_norm, calls.post_eps)
            x = calls.down(kernel.silu_and_mul(calls.gate_up(x)))
        x = kernel.add_rmsnorm(x, residual, self.norm.weight.detach(), self.norm.eps)[0]
        idx = batch.logits_token_idx
        if idx is not None:
            x = x[idx]
            return (lm_head if x.shape[0] == rows else linear_call(self.lm_head, x))(x).float()
        return lm_head(x).float()
