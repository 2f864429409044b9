"""`radixserve bench-lang` (or `python -m radixserve.lang.bench`): N copies of a representative
program run one after another, then with `run_batch`; prints both wall times and the speedup.

The program: a shared system prompt and a question, fork(2) with a different follow-up and a
gen in each branch, then a select of two choices. Every gen ignores EOS, so each copy generates
the same number of tokens; every copy has its own question (unique across passes and runs), so
the batch pass gets no cache hits the sequential pass did not also get (the system prompt).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from typing import Any

from radixserve.lang.api import assistant, gen, select, system, user
from radixserve.lang.backend import RuntimeEndpoint
from radixserve.lang.program import function

SYSTEM = (
    "You are a careful assistant for a science museum. Visitors ask short questions; answer "
    "plainly and correctly, in a friendly tone, without lists or headings."
)
SUBJECTS = ["volcanoes", "owls", "copper", "glaciers", "tea", "comets", "coral", "magnets"]
FOLLOW_UPS = ["Answer in one sentence.", "Answer with an example."]


@function
def museum_answer(s: Any, question: str, max_tokens: int) -> None:
    s += system(SYSTEM)
    s += user(question)
    forks = s.fork(2)
    for fork, follow_up in zip(forks, FOLLOW_UPS, strict=True):
        fork += user(follow_up)
        fork += assistant(gen("answer", max_tokens=max_tokens, ignore_eos=True))
    forks.join()
    s += user("Is this question about living things? Answer yes or no.")
    s += assistant(select("living", ["yes", "no"]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server")
    parser.add_argument("--api-key", default=None, help="bearer token, if the server wants one")
    parser.add_argument("--num-programs", type=int, default=16, help="copies of the program")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens each gen generates")
    parser.add_argument("--num-threads", default="auto", help='run_batch threads, or "auto"')
    parser.add_argument("--runs", type=int, default=1, help="repeat both passes; report medians")


def main(args: argparse.Namespace) -> dict[str, float]:
    """Runs the benchmark; returns the median sequential and batch seconds and the speedup."""
    backend = RuntimeEndpoint(args.base_url, api_key=args.api_key)
    threads = args.num_threads if args.num_threads == "auto" else int(args.num_threads)
    questions = _questions()
    warm_up = {**next(questions), "max_tokens": args.max_tokens}
    museum_answer.run(backend=backend, temperature=0, **warm_up)
    print(
        f"bench-lang: {args.num_programs} programs (system + question, fork(2) with a "
        f"{args.max_tokens}-token gen in each branch, select of 2) against {backend.base_url}"
    )
    sequential, batched = [], []
    for run in range(1, args.runs + 1):
        batch = [
            {**next(questions), "max_tokens": args.max_tokens} for _ in range(args.num_programs)
        ]
        began = time.perf_counter()
        for kwargs in batch:
            museum_answer.run(backend=backend, temperature=0, **kwargs)
        sequential.append(time.perf_counter() - began)
        batch = [
            {**next(questions), "max_tokens": args.max_tokens} for _ in range(args.num_programs)
        ]
        began = time.perf_counter()
        states = museum_answer.run_batch(batch, backend=backend, num_threads=threads, temperature=0)
        batched.append(time.perf_counter() - began)
        failed = [s.error() for s in states if s.error() is not None]
        if failed:
            raise RuntimeError(f"{len(failed)} programs failed in run_batch: {failed[0]}")
        print(_line(f"run {run}", sequential[-1], batched[-1]))
    result = {"sequential_s": statistics.median(sequential), "batch_s": statistics.median(batched)}
    result["speedup"] = result["sequential_s"] / result["batch_s"]
    if args.runs > 1:
        print(_line(f"median of {args.runs}", result["sequential_s"], result["batch_s"]))
    backend.close()
    return result


def _questions() -> Any:
    for k in itertools.count(1):
        subject = SUBJECTS[k % len(SUBJECTS)]
        yield {"question": f"Question {k}: what is one surprising fact about {subject}?"}


def _line(label: str, sequential: float, batched: float) -> str:
    return (
        f"{label}: sequential {sequential:.2f} s, run_batch {batched:.2f} s, "
        f"speedup {sequential / batched:.2f}x"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m radixserve.lang.bench", description=__doc__)
    add_arguments(parser)
    main(parser.parse_args())
