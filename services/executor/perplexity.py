"""`radixserve perplexity`: the model's perplexity on a shipped English text, per quantization.

The text (data/perplexity.txt, about 2,800 words of plain prose on everyday topics, about 3,200
tokens for SmolLM2) is tokenized whole, without special tokens, and scored in windows of
`--window` tokens that start every `--stride` tokens (default 512 and 256): each window is one
prefill through the engine, with prompt logprobs, and scores only the tokens no earlier window
scored, so every token after the first window is predicted from at least window - stride tokens
before it. Perplexity = exp(mean negative log-likelihood) over every token but the first.
With several `--quantization` modes the model is loaded once per mode, and each mode is scored
over each `--kv-cache-dtypes` pool (the K/V of a window stored in that dtype and read back by its
attention); each line also gives the change relative to `none` over the model's own KV dtype (or
to the first line when that is not among them).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from services.common.model_store import gguf_file, resolve_model_path
from services.executor.config import DTYPES, KV_CACHE_DTYPES
from services.executor.engine import Engine, EngineLimits
from services.executor.factory import kv_dtypes, pick_dtype, setup_cpu_process
from services.executor.model_config import ModelConfig
from services.executor.quantization import INT4_GROUP_SIZES, QUANTIZATION_METHODS, Quantization
from services.executor.sampling_params import SamplingParams
from services.executor.step import NewRequest, Slice, SlotWrite, StepInput
from services.executor.weights import load_model

DEFAULT_TEXT = Path(__file__).parent / "data" / "perplexity.txt"


@dataclass(frozen=True)
class Window:
    """Tokens [start, end) of the text, scoring targets [first_target, end) (each predicted from
    the window's tokens before it)."""

    start: int
    end: int
    first_target: int


@dataclass
class Result:
    quantization: str
    dtype: str
    kv_cache_dtype: str
    perplexity: float
    tokens: int  # targets scored
    windows: int
    seconds: float
    relative_change: float | None = None  # vs the reference mode, as a fraction


def windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """Windows of at most `window` tokens every `stride` tokens, covering targets 1..n-1 once.
    Raises ValueError unless 0 < stride <= window and window >= 2."""
    if window < 2 or not 0 < stride <= window:
        raise ValueError("need --window >= 2 and 0 < --stride <= --window")
    out, scored = [], 1  # target 0 has nothing before it
    for start in range(0, max(n_tokens - 1, 1), stride):
        end = min(start + window, n_tokens)
        if end > scored:
            out.append(Window(start, end, max(scored, start + 1)))
            scored = end
        if end == n_tokens:
            break
    return out


def nll(engine: Engine, ids: list[int], spans: list[Window]) -> tuple[float, int]:
    """Sum of -log p(target) over the targets of `spans`, and their count."""
    greedy = SamplingParams(temperature=0.0)
    total, count = 0.0, 0
    for i, w in enumerate(spans):
        piece = ids[w.start : w.end]
        step = StepInput(
            i + 1,
            release_rows=[0] if i else [],
            add=[NewRequest(0, f"window-{i}", greedy)],
            writes=[SlotWrite(0, 0, list(range(1, len(piece) + 1)))],
            slices=[Slice(0, 0, piece, sample=False, logprob_start=w.first_target - 1 - w.start)],
        )
        logprobs = engine.run_step(step).prompt_logprobs[0].logprobs
        assert len(logprobs) == w.end - w.first_target, (len(logprobs), w)
        total -= math.fsum(logprobs)
        count += len(logprobs)
    return total, count


def perplexity(
    model: nn.Module,
    cfg: ModelConfig,
    ids: list[int],
    window: int,
    stride: int,
    kv_dtype: torch.dtype | None = None,
) -> tuple[float, int, int]:
    """(perplexity, targets scored, windows) of `model` over the token ids `ids`, its KV pool
    in `kv_dtype` (None: the model's dtype)."""
    spans = windows(len(ids), window, stride)
    limits = EngineLimits(window + 1, 1, window, kv_dtype=kv_dtype)
    engine = Engine(model, cfg, limits, torch.device("cpu"))
    total, count = nll(engine, ids, spans)
    return math.exp(total / count), count, len(spans)


def text_ids(path: Path, model_dir: Path, max_tokens: int | None) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(path.read_text(), add_special_tokens=False)["input_ids"]
    return ids[:max_tokens] if max_tokens else ids


def run(args: argparse.Namespace) -> list[Result]:
    """One Result per --quantization mode, printed as it comes."""
    threads = setup_cpu_process(args.num_threads)
    path = resolve_model_path(args.model_path)
    cfg = ModelConfig.from_dir(path)
    panels = all(mode == "none" for mode in args.quantization)  # as the executor picks auto
    dtype = pick_dtype(args.dtype, torch.device("cpu"), panels)
    ids = text_ids(Path(args.text), path, args.max_tokens)
    print(
        f"model {path.name}, {dtype}, {threads} threads; {len(ids)} tokens of {args.text}, "
        f"windows of {args.window} every {args.stride}",
        flush=True,
    )
    pools = kv_dtypes(args.kv_cache_dtypes, dtype)
    results = []
    for mode in args.quantization:
        gguf = gguf_file(args.model_path) if mode == "gguf" else None
        quant = Quantization(mode, args.quantization_group_size, gguf)
        model = load_model(path, cfg, args.window, dtype, torch.device("cpu"), quantization=quant)
        for kv in pools:
            started = time.perf_counter()
            ppl, count, n_windows = perplexity(model, cfg, ids, args.window, args.stride, kv)
            seconds = time.perf_counter() - started
            names = (str(d).removeprefix("torch.") for d in (dtype, kv))
            results.append(Result(quant.label, *names, ppl, count, n_windows, seconds))
        del model
    _relative(results)
    for r in results:
        print(_fmt(r), flush=True)
    return results


def _relative(results: list[Result]) -> None:
    if len(results) < 2:
        return
    own = (r for r in results if r.quantization == "none" and r.kv_cache_dtype == r.dtype)
    ref = next(own, results[0])
    for r in results:
        r.relative_change = r.perplexity / ref.perplexity - 1


def _fmt(r: Result) -> str:
    change = "" if r.relative_change is None else f"  {r.relative_change * 100:+6.2f}% vs reference"
    kv = "" if r.kv_cache_dtype == r.dtype else f" kv {r.kv_cache_dtype}"
    return (
        f"perplexity {r.quantization:22s} {r.dtype:9s}{kv} {r.perplexity:9.4f}"
        f"  ({r.tokens} tokens, {r.windows} windows, {r.seconds:.1f} s){change}"
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", default="default")
    p.add_argument(
        "--quantization",
        nargs="+",
        default=["none"],
        choices=QUANTIZATION_METHODS,
        help="modes to evaluate, each on a freshly loaded model (see the executor's flag)",
    )
    p.add_argument("--quantization-group-size", type=int, default=32, choices=INT4_GROUP_SIZES)
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="activation (and float) dtype")
    p.add_argument(
        "--kv-cache-dtypes",
        nargs="+",
        default=["auto"],
        choices=KV_CACHE_DTYPES,
        help="KV cache dtypes to score each mode over (see the executor's --kv-cache-dtype)",
    )
    p.add_argument("--text", default=str(DEFAULT_TEXT), help="plain text file to score")
    p.add_argument("--window", type=int, default=512, help="tokens per window (the context)")
    p.add_argument("--stride", type=int, default=256, help="tokens between window starts")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results to this file")


def main(args: argparse.Namespace) -> None:
    with torch.inference_mode():
        results = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
        print(f"wrote {args.json}")
