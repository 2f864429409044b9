"""Stop regexes (SGLang's `stop_regex`): the one check the gateway and the tokenizer share."""

from __future__ import annotations

import re


def compile_stop_regex(pattern: str) -> re.Pattern[str]:
    """The pattern compiled by Python's `re`; ValueError for one that is invalid or matches the
    empty string (it would end every sample before its first character)."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None
    if compiled.search("") is not None:
        raise ValueError(f"the regular expression {pattern!r} matches the empty string")
    return compiled
