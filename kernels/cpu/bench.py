"""Times the CPU attention kernels (kernels/cpu/attention.cpp) or the float32 and bfloat16 panel
linears (kernels/cpu/linear_f32.cpp) alone, optionally against another revision of the same source
built beside it in the same process.

    python -m kernels.cpu.bench                                  # decode, batch 16, context 1000
    python -m kernels.cpu.bench --kv-dtype bfloat16 --context 4000 --layers 8
    python -m kernels.cpu.bench --kernel extend --new-tokens 64 --batch 7
    python -m kernels.cpu.bench --against HEAD~1                 # this tree against a revision
    python -m kernels.cpu.bench --shared-prefix-groups 4         # decode groups against plain
    python -m kernels.cpu.bench --kernel linear --batch 8 --against HEAD~1

Each layer has K and V pools of its own (`--layers`, 30 by default as in SmolLM2-135M), as in a
decode step, not the one pool a repeated call would leave in the cache. One round calls the
kernel once per layer; a build's figure is the median round.
With `--against REV`, the source and the headers it includes are taken from git revision REV,
built as a second extension, and the two builds run in alternating rounds, so a busy neighbour
slows both alike; the largest difference of their outputs is printed too (0 when a change keeps
every sum in the same order).

With `--shared-prefix-groups G`, the decode rows are in G groups (row b in group b mod G) whose
table rows start with the same `--shared-prefix-len` slots (default: all of `--context`), and the
rounds alternate `grouped_decode_attention` over those groups with the plain decode kernel over
the same table (kernels/cpu/cascade.py): the same outputs, but on CPUs with AVX2 and no AVX-512
the grouped form reads each span once for up to 8 of a group's rows.

GB/s is the K and V bytes the calls read (each request's positions x kv heads x head dim x the
pool's element size, twice) over the median time; for decode it is the figure to hold against
the machine's memory bandwidth (`radixserve bench-executor` measures that). Extend reads a
request's keys and values again for each block of its new tokens, so its figure counts distinct
bytes; with groups, a span counts once for each row that attends it. The pools come from memory
only when all layers' pools together outgrow the last-level cache (with `--layers 1` and a small
batch they stay in it). On CPUs with AMX, the engine runs bfloat16 extends on
`attention_amx.cpp`, which this tool does not time.

`--kernel linear` times `linear_f32_panels` (the float32 linears of CPUs with AVX2 and FMA but no
AVX-512, `PanelLinear`) over the decoder linears of `--layers` layers of a Llama-shaped model (q, k,
v and o projections from `--heads`, `--kv-heads` and `--head-dim`, gate, up and down from `--hidden`
and `--intermediate`; SmolLM2-135M's by default), each layer's weights random and its own, packed
into panels of 16 channels, for `--batch` rows of input; with `--linear-dtype bfloat16`,
`linear_bf16_f32_panels` over bfloat16 inputs and panels instead (those CPUs' linears under `--dtype
bfloat16`). All layers' weights together (425 MB by default, half in bfloat16) outgrow the
last-level cache, so each call reads its weight from memory, as in a decode step; GB/s is those
bytes over the median round. The other attention options do not apply.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from kernels.cpu import linear as cpu_linear
from kernels.cpu import load, load_error, supports_dtypes
from kernels.cpu.build import Extension, build_root, included_names
from kernels.cpu.cascade import reads_spans_once

SOURCE = Path(__file__).with_name("attention.cpp")
LINEAR_SOURCE = Path(__file__).with_name("linear_f32.cpp")
THIS_TREE = "this tree"
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "fp8_e5m2": torch.float8_e5m2,
}


def build_revision(revision: str, source: Path = SOURCE) -> ModuleType:
    """`source` (a file of kernels/cpu) and the headers it includes, as of git revision
    `revision`, built as an extension of its own. The files are written to a directory under
    torch's extension root named by a hash of their text, so a second run against the same
    sources reuses the build. Raises RuntimeError when git cannot show a file or the build
    fails."""
    repo = source.parents[2]
    texts: dict[str, str] = {}  # file name -> its text at the revision

    def show(name: str) -> str:
        spec = f"{revision}:kernels/cpu/{name}"
        try:
            shown = subprocess.run(
                ["git", "-C", str(repo), "show", "--end-of-options", spec],
                capture_output=True,
                text=True,
            )
        except OSError as exc:  # no git
            raise RuntimeError(f"git show {spec}: {exc}") from exc
        if shown.returncode != 0:
            raise RuntimeError(f"git show {spec}: {shown.stderr.strip()}")
        texts[name] = shown.stdout
        return shown.stdout

    included_names(show(source.name), show)  # fills texts with the source and its headers
    digest = hashlib.sha256("".join(texts[n] for n in sorted(texts)).encode()).hexdigest()[:12]
    directory = build_root() / f"radixserve_cpu_{source.stem}_sources_{digest}"
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        path = directory / name
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
    extension = Extension(
        f"radixserve_cpu_{source.stem}_against",
        directory / source.name,
        f"{source.name} at {revision}",
    )
    module = extension.load()
    if module is None:
        raise RuntimeError(f"building {source.name} at {revision} failed: {extension.error}")
    return module


def random_pools(
    args: argparse.Namespace, slots: int, gen: torch.Generator
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`--layers` (K, V) pairs of [slots, kv heads, head dim] random pools in `--kv-dtype`."""
    shape = (slots, args.kv_heads, args.head_dim)
    return [
        tuple(torch.randn(shape, generator=gen).to(DTYPES[args.kv_dtype]) for _ in range(2))
        for _ in range(args.layers)
    ]


def make_case(args: argparse.Namespace) -> tuple[Callable[[ModuleType, int], torch.Tensor], int]:
    """The call to time, as fn(module, layer) → output, and the K and V bytes one round reads.

    Decode: `--batch` requests of `--context` positions each, one query token each. Extend:
    `--batch` requests of `--new-tokens` new tokens after `--context` cached ones (causal). Slots
    are one run per request, or a random permutation of the pool with `--scatter`."""
    gen = torch.Generator().manual_seed(0)
    kv_dtype, q_dtype = DTYPES[args.kv_dtype], DTYPES[args.q_dtype]
    extend = args.kernel == "extend"
    positions = args.context + (args.new_tokens if extend else 0)
    slots = args.batch * positions + 1  # slot 0 unused, as in the engine's pool
    pools = random_pools(args, slots, gen)
    if args.scatter:
        order = torch.randperm(slots - 1, generator=gen) + 1
    else:
        order = torch.arange(1, slots)
    table = order.view(args.batch, positions).to(torch.int64).contiguous()
    rows = torch.arange(args.batch, dtype=torch.int64)
    tokens = args.batch * (args.new_tokens if extend else 1)
    q = torch.randn(tokens, args.heads, args.head_dim, generator=gen).to(q_dtype)
    scale = args.head_dim**-0.5
    if extend:
        prefix = torch.full((args.batch,), args.context, dtype=torch.int64)
        new = torch.full((args.batch,), args.new_tokens, dtype=torch.int64)

        def call(module: ModuleType, layer: int) -> torch.Tensor:
            k, v = pools[layer]
            return module.extend_attention(q, k, v, table, rows, prefix, new, scale)

    else:
        lens = torch.full((args.batch,), positions, dtype=torch.int64)

        def call(module: ModuleType, layer: int) -> torch.Tensor:
            k, v = pools[layer]
            return module.paged_decode_attention(q, k, v, table, rows, lens, scale)

    per_round = 2 * args.layers * args.batch * positions * args.kv_heads * args.head_dim
    return call, per_round * kv_dtype.itemsize


# --linear-dtype: the dtype of x and of the panels. float32: float32 models' linears
# (`linear_f32_panels`); bfloat16: `--dtype bfloat16` models' on CPUs without AVX-512
# (`linear_bf16_f32_panels`: x and weights widened to float32, each output rounded once).
LINEAR_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def linear_shapes(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(out features, in features) of one layer's decoder linears: q, k, v, o, gate, up, down."""
    q, kv = args.heads * args.head_dim, args.kv_heads * args.head_dim
    hidden, inter = args.hidden, args.intermediate
    return (
        [(q, hidden), (kv, hidden), (kv, hidden), (hidden, q)]
        + [(inter, hidden)] * 2
        + [(hidden, inter)]
    )


def make_linear_case(
    args: argparse.Namespace,
) -> tuple[Callable[[ModuleType, int], list[torch.Tensor]], int]:
    """The call to time, as fn(module, layer) → the layer's outputs, and the weight bytes one
    round reads (`--layers` layers of `linear_shapes`, in `--linear-dtype`)."""
    gen = torch.Generator().manual_seed(0)
    shapes = linear_shapes(args)
    dtype = LINEAR_DTYPES[args.linear_dtype]
    layers = [
        [
            cpu_linear.pack_panels16((torch.randn(n, k, generator=gen) * k**-0.5).to(dtype))
            for n, k in shapes
        ]
        for _ in range(args.layers)
    ]
    inputs = {k: torch.randn(args.batch, k, generator=gen).to(dtype) for _, k in shapes}

    def call(module: ModuleType, layer: int) -> list[torch.Tensor]:
        run = module.linear_bf16_f32_panels if dtype == torch.bfloat16 else module.linear_f32_panels
        return [
            run(inputs[k], panels, n, None)
            for (n, k), panels in zip(shapes, layers[layer], strict=True)
        ]

    return call, dtype.itemsize * args.layers * sum(n * k for n, k in shapes)


def make_grouped_case(
    args: argparse.Namespace, module: ModuleType
) -> tuple[dict[str, Callable[[int], torch.Tensor]], int]:
    """Decode with the rows in `--shared-prefix-groups` groups sharing their first
    `--shared-prefix-len` slots: {"grouped": fn(layer), "plain": fn(layer)} over the same table,
    and the K and V bytes one round's rows attend (each row's positions, shared or not)."""
    gen = torch.Generator().manual_seed(0)
    kv_dtype, q_dtype = DTYPES[args.kv_dtype], DTYPES[args.q_dtype]
    groups, span, own = args.shared_prefix_groups, args.shared_prefix_len, args.context
    own -= args.shared_prefix_len
    pools = random_pools(args, groups * span + args.batch * own + 1, gen)
    table = torch.empty(args.batch, args.context, dtype=torch.int64)
    for b in range(args.batch):
        table[b, :span] = 1 + (b % groups) * span + torch.arange(span)
        table[b, span:] = 1 + groups * span + b * own + torch.arange(own)
    rows = torch.arange(args.batch, dtype=torch.int64)
    lens = torch.full((args.batch,), args.context, dtype=torch.int64)
    order = torch.tensor([b for g in range(groups) for b in range(g, args.batch, groups)])
    offsets = torch.tensor([0, *range(args.batch // groups, args.batch + 1, args.batch // groups)])
    spans = torch.full((groups,), span, dtype=torch.int64)
    q = torch.randn(args.batch, args.heads, args.head_dim, generator=gen).to(q_dtype)
    scale = args.head_dim**-0.5

    def grouped(layer: int) -> torch.Tensor:
        k, v = pools[layer]
        return module.grouped_decode_attention(
            q, k, v, table, rows, lens, order, offsets, spans, scale
        )

    def plain(layer: int) -> torch.Tensor:
        k, v = pools[layer]
        return module.paged_decode_attention(q, k, v, table, rows, lens, scale)

    per_round = 2 * args.layers * args.batch * args.context * args.kv_heads * args.head_dim
    return {"grouped": grouped, "plain": plain}, per_round * kv_dtype.itemsize


def run(args: argparse.Namespace, out: Callable[[str], None] = print) -> dict[str, list[float]]:
    """Times every build for `args.rounds` rounds; returns each build's round times in ms.
    Raises RuntimeError when a build fails."""
    if args.threads:
        torch.set_num_threads(args.threads)
    linear = args.kernel == "linear"
    if linear:
        current = cpu_linear.f32_module()
        if current is None:
            error = cpu_linear.f32_load_error() or "disabled, or no AVX2 and FMA"
            raise RuntimeError(f"the float32 linear kernels could not be built: {error}")
    else:
        current = load()
        if current is None:
            raise RuntimeError(f"the attention kernels could not be built: {load_error()}")
    entries: dict[str, Callable[[int], torch.Tensor | list[torch.Tensor]]]  # name -> fn(layer)
    if args.shared_prefix_groups:
        entries, bytes_per_round = make_grouped_case(args, current)
        if not reads_spans_once(args.head_dim):
            out("(on this CPU, or at this head dim, the grouped form attends row by row)")
    else:
        builds = {THIS_TREE: current}
        if args.against:
            builds[args.against] = build_revision(args.against, LINEAR_SOURCE if linear else SOURCE)
        call, bytes_per_round = make_linear_case(args) if linear else make_case(args)
        entries = {
            name: (lambda layer, module=module: call(module, layer))
            for name, module in builds.items()
        }
    outputs = {name: fn(0) for name, fn in entries.items()}  # also warms up
    times: dict[str, list[float]] = {name: [] for name in entries}
    order = list(entries)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            for layer in range(args.layers):
                entries[name](layer)
            times[name].append((time.perf_counter() - start) * 1e3)
    if linear:
        what = (
            f"linear: {args.batch} rows x {len(linear_shapes(args))} {args.linear_dtype} panel "
            "linears "
            f"(hidden {args.hidden}, intermediate {args.intermediate}, {args.heads}/"
            f"{args.kv_heads} heads x {args.head_dim}), {args.layers} layers, "
            f"{torch.get_num_threads()} threads, medians of {args.rounds} rounds"
        )
        read = "weights"
    else:
        what, read = describe_attention(args)
    out(what)
    for name, ms in times.items():
        median = statistics.median(ms)
        out(
            f"  {name:>12}: {median:8.2f} ms a round ({median / args.layers * 1e3:7.1f} us a "
            f"layer), {bytes_per_round / median / 1e6:5.1f} GB/s of {read}"
        )
    if len(entries) == 2:
        (first, a), (second, b) = (
            (name, [o] if isinstance(o, torch.Tensor) else o) for name, o in outputs.items()
        )
        diff = max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b, strict=True))
        ratio = statistics.median(times[first]) / statistics.median(times[second])
        paired = statistics.median(x / y for x, y in zip(times[first], times[second], strict=True))
        fastest = min(times[first]) / min(times[second])
        out(
            f"  {first} takes {ratio:.3f}x the time of {second} (median of the rounds' ratios "
            f"{paired:.3f}, fastest rounds {fastest:.3f}); max |diff| {diff:g}"
        )
    return times


def describe_attention(args: argparse.Namespace) -> tuple[str, str]:
    """The attention run's description line, and what its GB/s counts."""
    what = (
        f"{args.kernel}: {args.batch} requests x "
        + (f"{args.new_tokens} new tokens after " if args.kernel == "extend" else "")
        + f"{args.context} positions, {args.heads}/{args.kv_heads} heads x {args.head_dim}, "
        + f"{args.q_dtype} queries over {args.kv_dtype} pools, {args.layers} layers, "
        + (
            f"{args.shared_prefix_groups} groups sharing {args.shared_prefix_len} positions, "
            if args.shared_prefix_groups
            else f"{'scattered' if args.scatter else 'contiguous'} slots, "
        )
        + f"{torch.get_num_threads()} threads, medians of {args.rounds} rounds"
    )
    # extend reads a request's keys and values again for each block of its new tokens
    read = "distinct K and V" if args.kernel == "extend" else "K and V"
    if args.shared_prefix_groups:  # a group's span counts once per row that attends it
        read = "K and V as the rows see them"
    return what, read


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kernels.cpu.bench", description=__doc__)
    parser.add_argument("--kernel", choices=("decode", "extend", "linear"), default="decode")
    parser.add_argument("--batch", type=int, default=16, help="requests (linear: rows)")
    parser.add_argument(
        "--context", type=int, default=1000, help="positions per request (extend: cached ones)"
    )
    parser.add_argument("--new-tokens", type=int, default=64, help="extend: new tokens each")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=576, help="linear: the model's width")
    parser.add_argument(
        "--intermediate", type=int, default=1536, help="linear: the MLP's inner width"
    )
    parser.add_argument("--kv-dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument(
        "--linear-dtype",
        choices=tuple(LINEAR_DTYPES),
        default="float32",
        help="linear: the dtype of x and the panels (bfloat16: linear_bf16_f32_panels)",
    )
    parser.add_argument("--q-dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--layers", type=int, default=30, help="layers, each with its own pools")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--scatter", action="store_true", help="slots in random order")
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument(
        "--against", metavar="REV", help="also time the kernel's source at this git revision"
    )
    parser.add_argument(
        "--shared-prefix-groups",
        type=int,
        default=0,
        metavar="G",
        help="decode: rows in G groups sharing a prefix, grouped kernel against plain",
    )
    parser.add_argument(
        "--shared-prefix-len", type=int, help="positions each group shares (default: --context)"
    )
    args = parser.parse_args(argv)
    names = ("batch", "context", "new_tokens", "heads", "kv_heads", "head_dim", "layers")
    for name in (*names, "hidden", "intermediate"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.rounds < 1 or args.threads < 0:
        parser.error("--rounds must be at least 1 and --threads at least 0")
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    if args.kernel == "extend" and args.head_dim % 64:
        parser.error(
            f"the extend kernel takes head dims that are multiples of 64, not {args.head_dim}"
        )
    if not supports_dtypes(DTYPES[args.q_dtype], DTYPES[args.kv_dtype]):
        parser.error(f"the kernels do not take {args.q_dtype} queries over {args.kv_dtype} pools")
    if args.against == THIS_TREE:
        parser.error(f"--against names a git revision, not {THIS_TREE!r}")
    if args.kernel == "linear" and (
        args.shared_prefix_groups or args.scatter or args.kv_dtype != "float32"
    ):
        parser.error("--kernel linear takes no --shared-prefix-groups, --scatter or --kv-dtype")
    if args.kernel != "linear" and args.linear_dtype != "float32":
        parser.error("--linear-dtype applies to --kernel linear only")
    if args.shared_prefix_len is not None and not args.shared_prefix_groups:
        parser.error("--shared-prefix-len needs --shared-prefix-groups")
    if args.shared_prefix_groups:
        groups = args.shared_prefix_groups
        if args.shared_prefix_len is None:
            args.shared_prefix_len = args.context
        if args.kernel != "decode" or args.against or args.scatter:
            parser.error(
                "--shared-prefix-groups times decode in this tree, without --against or --scatter"
            )
        if groups < 0 or args.batch % groups:
            parser.error(f"--shared-prefix-groups must divide --batch ({args.batch}), not {groups}")
        if not 1 <= args.shared_prefix_len <= args.context:
            parser.error(f"--shared-prefix-len must be 1 .. --context ({args.context})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
