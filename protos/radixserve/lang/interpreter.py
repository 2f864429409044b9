"""ProgramState: the state `s` a program appends to, executed on its own worker thread.

`s += expr` queues the expression and returns at once; the state's worker thread executes its
queue in order (text, role markers, gen and select calls to the server). Reading the state
(`s["name"]`, `s.text()`, `s.messages()`, `s.get_meta_info(name)`) waits for what it reads.
So the branches of a `fork` run concurrently: each is a state with its own worker, and their
requests share the text before the fork, which the server's radix cache holds once.

Locking: the worker writes the text, variables and meta info under `_changed` (a Condition,
notified on every change); readers wait on it. The first error (a ServerError from the server,
or an exception raised by the program) stops the state: later expressions are skipped, and every
read that cannot be answered raises it.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from radixserve.lang.backend import RuntimeEndpoint
from radixserve.lang.choices import choose
from radixserve.lang.ir import (
    Expr,
    Gen,
    RoleBegin,
    RoleEnd,
    SamplingParams,
    Select,
    Seq,
    Text,
    names,
    to_expr,
)


class ProgramState:
    """The text, conversation and captured variables of one running program (or fork)."""

    def __init__(self, backend: RuntimeEndpoint, defaults: SamplingParams, stream: bool) -> None:
        self.backend, self.defaults, self.stream = backend, defaults, stream
        self.ret_value: Any = None  # what the program function returned
        self._text = ""
        self._messages: list[dict[str, str]] = []
        self._vars: dict[str, Any] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._pending: Counter[str] = Counter()  # variables queued and not yet set
        self._role: str | None = None
        self._role_start = 0  # text position where the open role's content starts
        self._fork_start = 0  # text position where this state was forked
        self._error: BaseException | None = None
        self._finished = False  # the worker has stopped
        self._ended = False  # no more expressions are taken
        self._changed = threading.Condition()
        self._children: list[ProgramState] = []
        self._queue: queue.Queue[Expr | None] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="radixserve-lang", daemon=True)
        self._worker.start()

    # --- building the program -------------------------------------------------------------

    def __iadd__(self, other: Expr | str) -> ProgramState:
        if other is None:
            raise ValueError("cannot append None to a program state")
        self._submit(to_expr(other))
        return self

    def system(self, expr: Expr | str | None = None) -> Any:
        """`s.system(x)` appends a system block; `with s.system(): ...` opens one."""
        return self._role_block("system", expr)

    def user(self, expr: Expr | str | None = None) -> Any:
        return self._role_block("user", expr)

    def assistant(self, expr: Expr | str | None = None) -> Any:
        return self._role_block("assistant", expr)

    def fork(self, size: int = 1) -> ProgramStateGroup:
        """`size` states that continue from this one's text, conversation and variables; waits
        for this state's queued expressions first. Raises the state's error, if any."""
        self.sync()
        if self._error is not None:
            raise self._error
        states = [self._copy() for _ in range(int(size))]
        self._children.extend(states)
        return ProgramStateGroup(states, self)

    # --- reading it -----------------------------------------------------------------------

    def __getitem__(self, name: str) -> Any:
        return self.get_var(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.set_var(name, value)

    def __contains__(self, name: str) -> bool:
        return name in self._vars

    def get_var(self, name: str) -> Any:
        """The variable `name`, once every queued expression that sets it has run. Raises the
        state's error if it stopped first, KeyError for a name nothing sets."""
        with self._changed:
            self._changed.wait_for(lambda: not self._pending[name] or self._error is not None)
            if self._pending[name] or (self._error is not None and name not in self._vars):
                raise self._error  # type: ignore[misc]
            return self._vars[name]

    def set_var(self, name: str, value: Any) -> None:
        with self._changed:
            self._vars[name] = value
            self._changed.notify_all()

    def get_meta_info(self, name: str) -> dict[str, Any] | None:
        """The server's meta_info for the gen call that set `name` (prompt_tokens,
        completion_tokens, cached_tokens, finish_reason, ...), or select's scores
        (normalized_prompt_logprobs, input_token_logprobs, ... one entry per choice)."""
        self.get_var(name)
        return self._meta.get(name)

    def text(self) -> str:
        """The whole text so far, role prefixes and suffixes included (not the tokens the server
        adds before every prompt itself)."""
        self.sync()
        return self._text

    def messages(self) -> list[dict[str, str]]:
        """The role blocks so far as OpenAI chat messages ({"role", "content"})."""
        self.sync()
        return [dict(m) for m in self._messages]

    def error(self) -> BaseException | None:
        """The error that stopped this state, or None."""
        self.sync()
        return self._error

    def sync(self) -> None:
        """Waits until every queued expression has run."""
        self._queue.join()

    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """The text (or variable `var_name`) as it grows: with `run(stream=True)`, chunks as the
        server streams them, ending when the program (or the variable) is done; without, the
        final value once. Raises the state's error after the text that came before it."""
        if not self.stream:
            yield self.text() if var_name is None else self.get_var(var_name)
            return
        sent = 0
        while True:
            with self._changed:
                self._changed.wait_for(functools.partial(self._grew_or_done, var_name, sent))
                piece = self._current(var_name)[sent:]
                done = self._done(var_name)
            sent += len(piece)
            if piece:
                yield piece
            if done and not piece:
                if self._error is not None:
                    raise self._error
                return

    # --- the worker -------------------------------------------------------------------------

    def _submit(self, expr: Expr) -> None:
        if self._ended:
            raise RuntimeError("this program state has ended and takes no more expressions")
        with self._changed:
            self._pending.update(names(expr))
        self._queue.put(expr)

    def _work(self) -> None:
        while (expr := self._queue.get()) is not None:
            try:
                if self._error is None:
                    self._execute(expr)
            except Exception as exc:
                self._fail(exc)
            finally:
                self._queue.task_done()
        with self._changed:
            self._finished = True
            self._changed.notify_all()
        self._queue.task_done()

    def _fail(self, exc: BaseException) -> None:
        with self._changed:
            if self._error is None:
                self._error = exc
            self._changed.notify_all()

    def _end(self) -> None:
        """Ends this state and its forks: runs what is queued, then stops the workers."""
        for child in self._children:
            child._end()
        if not self._ended:
            self._ended = True
            self._queue.put(None)
        self._worker.join()

    def _execute(self, expr: Expr) -> None:
        if isinstance(expr, Text):
            self._append(expr.value)
        elif isinstance(expr, Seq):
            for item in expr.items:
                self._execute(item)
        elif isinstance(expr, RoleBegin):
            self._begin_role(expr.role)
        elif isinstance(expr, RoleEnd):
            self._end_role(expr.role)
        elif isinstance(expr, Gen):
            self._gen(expr)
        elif isinstance(expr, Select):
            decision = choose(self.backend, self._text, expr.choices, expr.temperature)
            self._append(decision.choice)
            self._set(expr.name, decision.choice, decision.meta_info)
        else:
            raise TypeError(f"cannot execute {expr!r}")

    def _append(self, text: str, var: str | None = None) -> None:
        with self._changed:
            self._text += text
            if var is not None:
                self._vars[var] += text
            self._changed.notify_all()

    def _set(self, name: str | None, value: Any, meta: dict[str, Any]) -> None:
        if name is None:
            return
        with self._changed:
            self._vars[name], self._meta[name] = value, meta
            self._pending[name] -= 1
            self._changed.notify_all()

    def _begin_role(self, role: str) -> None:
        if self._role is not None:
            raise ValueError(f"a {role} block cannot open inside the {self._role} block")
        template = self.backend.chat_template
        if not self._messages and role != "system":
            self._append(template.default_system)
        self._append(template.prefix(role))
        self._role, self._role_start = role, len(self._text)

    def _end_role(self, role: str) -> None:
        assert self._role == role, f"{role} block ends while {self._role} is open"
        content = self._text[self._role_start :]
        self._append(self.backend.chat_template.suffix(role))
        self._messages.append({"role": role, "content": content})
        self._role = None

    def _gen(self, expr: Gen) -> None:
        params = self.defaults.merged(expr.params)
        body = {"text": self._text, "sampling_params": params.to_native()}
        if not self.stream:
            out = self.backend.generate(body)
            self._append(out["text"])
            self._set(expr.name, out["text"], out["meta_info"])
            return
        var = expr.name
        if var is not None:
            self.set_var(var, "")
        meta: dict[str, Any] = {}
        for event in self.backend.generate_stream(body):
            self._append(event["text"], var)
            meta = event["meta_info"]
        self._set(var, self._vars[var] if var is not None else None, meta)

    # --- helpers ----------------------------------------------------------------------------

    def _role_block(self, role: str, expr: Expr | str | None) -> Any:
        if expr is not None:
            self += Seq([RoleBegin(role), to_expr(expr), RoleEnd(role)])
            return None
        return self._role_scope(role)

    @contextmanager
    def _role_scope(self, role: str) -> Iterator[None]:
        self += RoleBegin(role)
        yield
        self += RoleEnd(role)

    def _copy(self) -> ProgramState:
        child = ProgramState(self.backend, self.defaults, self.stream)
        child._text, child._fork_start = self._text, len(self._text)
        child._messages, child._vars = list(self._messages), dict(self._vars)
        child._meta = dict(self._meta)
        child._role, child._role_start = self._role, self._role_start
        return child

    def _current(self, var: str | None) -> str:
        return self._text if var is None else str(self._vars.get(var, ""))

    def _grew_or_done(self, var: str | None, sent: int) -> bool:
        return len(self._current(var)) > sent or self._done(var)

    def _done(self, var: str | None) -> bool:
        stopped = self._finished or self._error is not None
        if var is None:
            return stopped
        return stopped or (var in self._vars and not self._pending[var])


class ProgramStateGroup:
    """The states `s.fork(n)` returns: index them (`forks[i] += ...`), or append to all at once
    (`forks += expr`, a list of n expressions, or a function of the index)."""

    def __init__(self, states: list[ProgramState], parent: ProgramState) -> None:
        self.states, self.parent = states, parent

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __setitem__(self, i: int, state: ProgramState) -> None:
        # `forks[i] += x` appends to forks[i], then stores it back here.
        if state is not self.states[i]:
            raise TypeError("a fork cannot be replaced by another state")

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self.states)

    def __iadd__(self, other: Expr | str | list | tuple | Callable[[int], Expr | str]) -> Any:
        for i, state in enumerate(self.states):
            if callable(other):
                state += other(i)
            elif isinstance(other, list | tuple):
                state += other[i]
            else:
                state += other
        return self

    def join(self, mode: str = "gather_variable") -> None:
        """Waits for every fork and ends them. `gather_variable` (SGLang's default): each
        variable the forks set that the parent lacks becomes, in the parent, the list of its
        values in the forks that set it, in fork order. `concate_and_append`: the forks' new text is appended to the parent's, in
        order. Raises the first fork's error."""
        if mode not in ("gather_variable", "concate_and_append"):
            raise ValueError(f"unknown join mode {mode!r}")
        for state in self.states:
            state._end()
        for state in self.states:
            if state._error is not None:
                raise state._error
        if mode == "concate_and_append":
            self.parent += "".join(s._text[s._fork_start :] for s in self.states)
            return
        with self.parent._changed:
            known = set(self.parent._vars)
        for name in {n for s in self.states for n in s._vars} - known:
            self.parent.set_var(name, [s._vars[name] for s in self.states if name in s._vars])
