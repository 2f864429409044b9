"""`@function` programs: run one (optionally streamed) or a batch on a thread pool."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from tqdm import tqdm

from radixserve.lang.backend import RuntimeEndpoint
from radixserve.lang.interpreter import ProgramState
from radixserve.lang.ir import SamplingParams

_default_backend: RuntimeEndpoint | None = None


def set_default_backend(backend: RuntimeEndpoint) -> None:
    """The backend programs run on when `run` / `run_batch` get none."""
    global _default_backend
    _default_backend = backend


def get_default_backend() -> RuntimeEndpoint:
    """The default backend; RuntimeError when none is set."""
    if _default_backend is None:
        raise RuntimeError(
            "no backend: pass backend= or call set_default_backend(RuntimeEndpoint(url))"
        )
    return _default_backend


class Function:
    """A program: a Python function `f(s, **args)` that appends to its state `s`."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        functools.update_wrapper(self, func)

    def __call__(self, *args: Any, **kwargs: Any) -> ProgramState:
        return self.run(*args, **kwargs)

    def run(
        self,
        *args: Any,
        max_new_tokens: int | None = None,
        stop: str | list[str] | None = None,
        stop_token_ids: list[int] | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        frequency_penalty: float | None = None,
        presence_penalty: float | None = None,
        ignore_eos: bool | None = None,
        seed: int | None = None,
        stream: bool = False,
        backend: RuntimeEndpoint | None = None,
        **kwargs: Any,
    ) -> ProgramState:
        """Runs the program with `args` / `kwargs`; the sampling arguments are the defaults of
        its `gen` calls (None: the server's default).

        Without `stream`, returns the finished state and raises the first error (ServerError for
        the server's, or what the program raised). With `stream`, returns at once: the program
        runs on a thread, `state.text_iter()` follows it, and an error is raised by reading the
        state (`state.error()` returns it).
        """
        defaults = SamplingParams(
            max_new_tokens=max_new_tokens,
            stop=stop,
            stop_token_ids=stop_token_ids,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            ignore_eos=ignore_eos,
            seed=seed,
        )
        state = ProgramState(backend or get_default_backend(), defaults, stream)
        if stream:
            threading.Thread(target=self._execute, args=(state, args, kwargs), daemon=True).start()
            return state
        self._execute(state, args, kwargs)
        if state._error is not None:
            raise state._error
        return state

    def run_batch(
        self,
        batch_kwargs: list[dict[str, Any]],
        *,
        backend: RuntimeEndpoint | None = None,
        num_threads: int | Literal["auto"] = "auto",
        progress_bar: bool = False,
        **sampling: Any,
    ) -> list[ProgramState]:
        """Runs the program once per kwargs dict, `num_threads` at a time ("auto": one thread per
        program, at most 64), and returns the finished states in the order of `batch_kwargs`.
        `sampling` takes run()'s sampling arguments. A program that fails does not stop the
        others: its state's `error()` returns the error, and reading its variables raises it."""
        backend = backend or get_default_backend()
        defaults = SamplingParams(**sampling)
        workers = min(64, len(batch_kwargs)) if num_threads == "auto" else int(num_threads)

        def run_one(kwargs: dict[str, Any]) -> ProgramState:
            state = ProgramState(backend, defaults, False)
            self._execute(state, (), kwargs)
            return state

        with (
            ThreadPoolExecutor(max(1, workers)) as pool,
            tqdm(total=len(batch_kwargs), disable=not progress_bar) as bar,
        ):
            futures = [pool.submit(run_one, kwargs) for kwargs in batch_kwargs]
            for future in futures:
                future.add_done_callback(lambda _: bar.update())
            return [future.result() for future in futures]

    def _execute(self, state: ProgramState, args: tuple, kwargs: dict[str, Any]) -> None:
        """Runs the function on `state`, then ends the state (its worker and forks); an error is
        recorded on the state, never raised here."""
        try:
            state.ret_value = self.func(state, *args, **kwargs)
        except Exception as exc:
            state._fail(exc)
        finally:
            state._end()


def function(func: Callable[..., Any] | None = None) -> Any:
    """Decorator: `@function def prog(s, **args): ...` makes `prog` a Function (`prog.run`,
    `prog.run_batch`); `@function()` works too."""
    if func is None:
        return Function
    return Function(func)
