"""The expressions a program appends to its state, and the sampling parameters of a `gen`.

Expressions are plain data: `s += expr` queues one on the state, and the interpreter
(`interpreter.py`) executes them in order. `+` joins expressions (and strings) into a sequence, so
`user("Q: " + question) + assistant(gen("a"))` is one expression.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


class Expr:
    """An expression of the language; `a + b` is the sequence a then b."""

    def __add__(self, other: Expr | str) -> Seq:
        return Seq([self, to_expr(other)])

    def __radd__(self, other: str) -> Seq:
        return Seq([to_expr(other), self])


@dataclass
class Text(Expr):
    """Literal text appended to the state."""

    value: str


@dataclass
class Seq(Expr):
    """Expressions executed one after another."""

    items: list[Expr]


@dataclass
class RoleBegin(Expr):
    role: str


@dataclass
class RoleEnd(Expr):
    role: str


@dataclass(frozen=True)
class SamplingParams:
    """Sampling options of a `gen` call; None means "not set here". `run()` gives the defaults,
    a `gen` call overrides them field by field, and what stays None takes the server's default
    (SGLang's: 128 new tokens, temperature 1)."""

    max_new_tokens: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    ignore_eos: bool | None = None
    regex: str | None = None
    json_schema: str | None = None  # a JSON schema, serialized
    seed: int | None = None

    def merged(self, override: SamplingParams) -> SamplingParams:
        """These parameters with every field `override` sets replaced."""
        changes = {f.name: getattr(override, f.name) for f in fields(self)}
        return SamplingParams(
            **{k: v if v is not None else getattr(self, k) for k, v in changes.items()}
        )

    def to_native(self) -> dict[str, Any]:
        """The `sampling_params` object of /generate (SGLang's names), set fields only."""
        body = {f.name: getattr(self, f.name) for f in fields(self)}
        body["sampling_seed"] = body.pop("seed")
        return {k: v for k, v in body.items() if v is not None}


@dataclass
class Gen(Expr):
    """Generate text after the state's text and capture it as `name`."""

    name: str | None
    params: SamplingParams


@dataclass
class Select(Expr):
    """Append the choice the model scores highest and capture it as `name`."""

    name: str | None
    choices: list[str]
    temperature: float = 0.0


def to_expr(value: Expr | str) -> Expr:
    """An expression, or text for a string (other values are formatted with str())."""
    return value if isinstance(value, Expr) else Text(str(value))


def names(expr: Expr) -> list[str]:
    """The variables an expression captures, in order."""
    if isinstance(expr, Gen | Select):
        return [expr.name] if expr.name is not None else []
    if isinstance(expr, Seq):
        return [n for item in expr.items for n in names(item)]
    return []
