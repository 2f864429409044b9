"""`radixserve bench-executor`: argument handling, KV layouts of its cases, its floors."""

from __future__ import annotations

import argparse
import os
import time

import pytest
import torch

import kernels.cpu as cpu_kernels
import services.executor.bench as bench_module
from services.executor.batch_invariant import BatchInvariantLinear
from services.executor.bench import (
    GREEDY,
    WARMUP_STEPS,
    DecodeCase,
    add_arguments,
    bench_decode,
    bench_prefill,
    cpu_load,
    decode_cases,
    dtype_names,
    kv_positions,
    max_positions,
    shared_spans,
    slot_writes,
)
from services.executor.bench_floors import (
    head_floor_ms,
    linear_floor_ms,
    matmul_gflop,
    memory_bandwidth,
    weight_bytes,
)
from services.executor.factory import kv_dtypes, pick_dtype
from services.executor.model_config import ModelConfig
from services.executor.quantization import (
    QUANTIZED_LINEARS,
    Int8Linear,
    quantize_linears,
    quantized_bytes,
)
from services.executor.weights import build_model, load_weights
from tests.executor.tiny import hf_model


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_context_is_an_alias_of_one_context_and_positions_cover_every_span() -> None:
    assert parse("--context", "1000").contexts == [1000]
    args = parse("--contexts", "256", "1000", "4000", "--steps", "7", "--prefill-len", "512")
    assert args.contexts == [256, 1000, 4000]
    assert max_positions(args) >= 4000 + WARMUP_STEPS + 7 + 2
    assert max_positions(parse("--context", "8", "--prefill-len", "512")) == 513


def test_auto_times_the_dtype_the_server_picks_and_unknown_dtypes_are_refused(capsys) -> None:
    auto = str(pick_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    assert auto in ("float32", "bfloat16")
    assert dtype_names(parse("--dtypes", "auto").dtypes) == [auto]
    assert dtype_names(["bfloat16", "auto", "float32"]) == ["bfloat16", "float32"]
    assert dtype_names(parse().dtypes) == ["float32", "bfloat16"]
    with pytest.raises(SystemExit):
        parse("--dtypes", "fp8")
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


def test_kv_cache_dtypes_are_timed_once_each_and_refused_where_the_model_cannot_take_them(
    capsys,
) -> None:
    assert parse().kv_cache_dtypes == ["auto"]
    names = parse("--kv-cache-dtypes", "auto", "bf16", "bfloat16", "fp8_e5m2").kv_cache_dtypes
    assert kv_dtypes(names, torch.float32) == [torch.float32, torch.bfloat16, torch.float8_e5m2]
    assert kv_dtypes(names, torch.bfloat16) == [torch.bfloat16, torch.float8_e5m2]
    with pytest.raises(SystemExit, match="needs a float32 or bfloat16 model"):
        kv_dtypes(["bf16"], torch.float16)
    with pytest.raises(SystemExit):
        parse("--kv-cache-dtypes", "fp8_e4m3")
    assert "invalid choice: 'fp8_e4m3'" in capsys.readouterr().err


def test_a_narrow_kv_cache_is_timed_over_a_pool_of_its_dtype(monkeypatch) -> None:
    hf = hf_model("llama")
    cfg = ModelConfig.from_dict(hf.config.to_dict())
    model = build_model(cfg, 128, torch.float32, torch.device("cpu"))
    load_weights(model, hf.state_dict().items())
    pools = []
    real = bench_module._engine

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        engine = real(*args, **kwargs)
        pools.append(engine.pool.k[0].dtype)
        return engine

    monkeypatch.setattr(bench_module, "_engine", spy)
    assert bench_decode(model, cfg, 3, 40, 2, kv_dtype=torch.bfloat16).ms > 0
    assert bench_prefill(model, cfg, 2, 24, kv_dtype=torch.bfloat16) > 0
    assert bench_decode(model, cfg, 3, 40, 2).ms > 0
    assert bench_decode(model, cfg, 3, 40, 2, kv_dtype=torch.float8_e5m2).ms > 0
    assert pools == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float8_e5m2]


def test_cases_follow_the_flags() -> None:
    args = parse("--sampling", "--shared-prefix-groups", "2", "--shared-prefix-len", "40")
    cases = decode_cases(args, 64)
    labels = ["greedy", "sampled", "shared-prefix 2x40", "shared-prefix-plain 2x40"]
    assert [c.label for c in cases] == labels
    assert not cases[1].params.greedy and cases[1].params.top_p == 0.9
    assert cases[2].cascade and not cases[3].cascade
    assert decode_cases(parse("--shared-prefix-groups", "3"), 100)[-1].prefix_len == 75


def test_shared_spans_name_each_group_of_the_cascade_case_only() -> None:
    case = DecodeCase("shared-prefix", GREEDY, groups=2, prefix_len=5)
    spans = shared_spans(case, batch=4)
    assert [(s.length, s.rows) for s in spans] == [(5, [0, 1]), (5, [2, 3])]
    assert shared_spans(DecodeCase("p", GREEDY, 2, 5, cascade=False), batch=4) == []
    assert kv_positions(4, 8, spans) == 2 * 5 + 4 * 3
    assert kv_positions(4, 8, spans[:1]) == 5 + 2 * 3 + 2 * 8
    assert kv_positions(4, 8, []) == 4 * 8


def test_shared_prefix_rows_of_a_group_point_at_the_same_slots() -> None:
    case = DecodeCase("shared-prefix", GREEDY, groups=2, prefix_len=5)
    writes, used = slot_writes(case, batch=4, span=8)
    assert used == 2 * 5 + 4 * 3
    tables = [w.kv_indices for w in writes]
    assert tables[0][:5] == tables[1][:5] != tables[2][:5] == tables[3][:5]
    tails = [k for t in tables for k in t[5:]]
    assert len(set(tails)) == len(tails) and not set(tails) & {k for t in tables for k in t[:5]}
    assert {k for t in tables for k in t} == set(range(1, used + 1))
    assert kv_positions(4, 8, shared_spans(case, batch=4)) == used


@pytest.mark.parametrize("extend", ["kernel", "sdpa"])
def test_decode_runs_at_a_context_past_the_prefill_length(
    extend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The extend attention is pinned because it decides the spans: where torch's SDPA runs it
    # (the default on CPUs without AVX2, and at head dims other than 64 on CPUs without AVX-512)
    # and the C++ kernels are built, the engine drops them.
    monkeypatch.setenv("RADIXSERVE_CPU_EXTEND_ATTENTION", extend)
    drops_spans = extend == "sdpa" and cpu_kernels.load() is not None
    hf = hf_model("llama")
    cfg = ModelConfig.from_dict(hf.config.to_dict())
    args = parse("--context", "300", "--steps", "2", "--prefill-len", "16")
    model = build_model(cfg, max_positions(args), torch.float32, torch.device("cpu"))
    load_weights(model, hf.state_dict().items())
    for case in decode_cases(parse("--sampling", "--shared-prefix-groups", "2"), 300):
        timing = bench_decode(model, cfg, 4, 300, 2, case=case)
        # Head dim 16 runs the PyTorch attention, which keeps every span it is given: the
        # cascade case reads each group's 225 shared positions once, the others every position
        # per row.
        spans_kept = case.cascade and case.groups and not drops_spans
        assert timing.ms > 0 and timing.kv_positions == (750 if spans_kept else 4 * 300)
    # tied embeddings: the head reads the embedding table, so every weight counts once
    assert weight_bytes(model) == sum(p.numel() * 4 for p in model.parameters())
    assert memory_bandwidth(gib=1 / 64, repeats=2) > 0


def test_a_cached_prefix_prefill_computes_only_the_tokens_after_the_shared_prefix(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse("--context", "8", "--prefill-len", "24", "--prefill-cached-len", "40")
    assert max_positions(args) == 40 + 24 + 1
    with pytest.raises(SystemExit):
        parse("--prefill-cached-len", "-1")
    assert "must be 0 or more, not -1" in capsys.readouterr().err
    hf = hf_model("llama")
    cfg = ModelConfig.from_dict(hf.config.to_dict())
    model = build_model(cfg, max_positions(args), torch.float32, torch.device("cpu"))
    load_weights(model, hf.state_dict().items())
    steps = []
    real = bench_module.Engine.run_step

    def spy(self: bench_module.Engine, step: bench_module.StepInput) -> object:
        steps.append(step)
        return real(self, step)

    monkeypatch.setattr(bench_module.Engine, "run_step", spy)
    assert bench_prefill(model, cfg, 3, 24, cached=40) > 0
    # Per repetition: row 0 computes the prefix (untimed), then every row its own 24 tokens.
    assert [[(s.row, s.start, len(s.input_ids)) for s in step.slices] for step in steps] == [
        [(0, 0, 40)],
        [(0, 40, 24), (1, 40, 24), (2, 40, 24)],
    ] * 2
    tables = [w.kv_indices for w in steps[0].writes]
    assert tables[0][:40] == tables[1][:40] == tables[2][:40] == list(range(1, 41))
    tails = [k for t in tables for k in t[40:]]
    assert len(tails) == 3 * 24 and len(set(tails)) == len(tails) and min(tails) == 41
    assert steps[2].release_rows == [0, 1, 2] and not steps[1].add


def test_deterministic_mode_times_the_batch_invariant_engine() -> None:
    hf = hf_model("llama")
    cfg = ModelConfig.from_dict(hf.config.to_dict())
    model = build_model(cfg, 64, torch.float32, torch.device("cpu"))
    load_weights(model, hf.state_dict().items())
    assert bench_decode(model, cfg, 3, 40, 2, deterministic=True).ms > 0
    assert bench_prefill(model, cfg, 2, 24, deterministic=True) > 0
    wrapped = [m for m in model.modules() if isinstance(m, BatchInvariantLinear)]
    assert len(wrapped) == cfg.num_layers * 4 + 1  # qkv, o, gate_up, down per layer; the head


def test_quantized_weights_count_as_stored_and_time_under_tiles() -> None:
    hf = hf_model("llama")
    cfg = ModelConfig.from_dict(hf.config.to_dict())
    model = build_model(cfg, 64, torch.bfloat16, torch.device("cpu"))
    load_weights(model, hf.state_dict().items())
    before = weight_bytes(model)
    quantize_linears(model, "int4", 32)
    linears = [m for m in model.modules() if isinstance(m, QUANTIZED_LINEARS)]
    norms = sum(p.numel() * 2 for n, p in model.named_parameters() if n.endswith("norm.weight"))
    assert weight_bytes(model) == sum(quantized_bytes(m) for m in linears) + norms
    assert isinstance(model.lm_head, Int8Linear)  # the head at 8 bits, the rest at 4
    assert weight_bytes(model) < before / 2
    assert linear_floor_ms(model, 4, repeats=1) > 0 and head_floor_ms(model, 4, repeats=1) > 0
    assert bench_decode(model, cfg, 3, 40, 2, deterministic=True).ms > 0
    assert head_floor_ms(model, 2, repeats=1) > 0  # the head now wrapped in tiles
    args = parse("--quantization", "none", "int8", "--quantization-group-size", "64")
    assert (args.quantization, args.quantization_group_size) == (["none", "int8"], 64)


def test_the_matmul_floors_operations_count_every_projection_and_the_head_rows() -> None:
    hf = hf_model("llama")
    cfg = ModelConfig.from_dict(hf.config.to_dict())
    model = build_model(cfg, 64, torch.float32, torch.device("cpu"))
    load_weights(model, hf.state_dict().items())
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    q, kv = cfg.q_size, cfg.kv_size
    # per layer and row: QKV, output, gate-up and down projections; the head per sampled row
    per_row = layers * (h * (q + 2 * kv) + q * h + h * 2 * inter + inter * h)
    head = h * cfg.vocab_size
    assert matmul_gflop(model, 7, 3) * 1e9 == pytest.approx(2 * (7 * per_row + 3 * head))
    assert matmul_gflop(model, 5, 0) * 1e9 == pytest.approx(2 * 5 * per_row)


def test_the_cpu_load_spends_its_share_of_a_core_and_is_reaped() -> None:
    """--cpu-load 2 4 for half a second: the other process uses CPU, at most half a core (it
    sleeps out each period) plus its start-up, and is reaped afterwards; out-of-range loads are
    refused."""
    assert parse("--cpu-load", "2", "4").cpu_load == [2.0, 4.0]
    started = time.monotonic()
    with cpu_load(2.0, 4.0) as load:
        time.sleep(0.5)
    wall = time.monotonic() - started
    assert 0 < load.cpu_s <= 0.5 * wall + 0.15  # half a core at most, plus interpreter start-up
    with pytest.raises(ProcessLookupError):
        os.kill(load.pid, 0)
    for busy, period in ((4.0, 4.0), (1.0, float("inf"))):
        with pytest.raises(ValueError, match="BUSY_MS < PERIOD_MS"), cpu_load(busy, period):
            pass
