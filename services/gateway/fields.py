"""What the gateway does with each request field: honoured, accepted with no effect, or rejected.

Every field of /v1/chat/completions, /v1/completions and /generate (with its `sampling_params`) is
in exactly one of three lists, each entry with a one-line note:

- honoured: the field changes the result;
- no effect: accepted, documented as doing nothing here;
- rejected: a 400 naming the field (`param`) unless it is set to its no-op value (null, or what the
  rule accepts).

`FieldTable.check` runs on the raw JSON object, so fields the pydantic models do not declare are
seen too. A field in no list is accepted, as vLLM does, and logged once per endpoint and name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.gateway.errors import InvalidRequest

log = logging.getLogger("radixserve.gateway")

# (value, the object holding it) → whether the value is accepted.
Accepts = Callable[[Any, Mapping[str, Any]], bool]


def _any(value: Any, obj: Mapping[str, Any]) -> bool:
    return True


def _null(value: Any, obj: Mapping[str, Any]) -> bool:
    return value is None


def _null_or(*allowed: Any) -> Accepts:
    return lambda value, obj: value is None or value in allowed


def _null_or_n(value: Any, obj: Mapping[str, Any]) -> bool:
    return value is None or value == obj.get("n", 1)


@dataclass(frozen=True)
class Rule:
    """A field's note (as docs/api.md lists it, and a 400's reason) and the values accepted for it."""

    note: str
    accepts: Accepts = _any


def rejected(note: str, accepts: Accepts = _null) -> Rule:
    """A field refused unless `accepts` its value (by default only null)."""
    return Rule(note, accepts)


@dataclass(frozen=True)
class FieldTable:
    """The three lists of one endpoint (or of an object nested in its body)."""

    endpoint: str
    honoured: Mapping[str, Rule]
    no_effect: Mapping[str, Rule]
    rejected: Mapping[str, Rule]
    nested: Mapping[str, FieldTable] = field(default_factory=dict)  # field → its object's table

    def __post_init__(self) -> None:
        lists = (self.honoured, self.no_effect, self.rejected)
        names = [name for rules in lists for name in rules]
        assert len(names) == len(set(names)), f"{self.endpoint}: a field in two lists"
        assert set(self.nested) <= set(self.honoured)

    def rule(self, name: str) -> Rule | None:
        for rules in (self.honoured, self.no_effect, self.rejected):
            if name in rules:
                return rules[name]
        return None

    def check(self, obj: Mapping[str, Any], prefix: str = "") -> None:
        """Raises InvalidRequest for a value a field's rule refuses; logs unknown fields once."""
        for name, value in obj.items():
            param = prefix + name
            rule = self.rule(name)
            if rule is None:
                _warn_unknown(self.endpoint, param)
            elif not rule.accepts(value, obj):
                raise InvalidRequest(f"invalid '{param}': {rule.note}", param=param)
            elif name in self.nested and isinstance(value, dict):
                self.nested[name].check(value, f"{param}.")


# Distinct unknown fields logged: a client inventing names cannot grow the set past this.
MAX_WARNED = 256
_warned: set[tuple[str, str]] = set()  # (endpoint, field) already logged


def _warn_unknown(endpoint: str, param: str) -> None:
    key = (endpoint, param)
    if key in _warned or len(_warned) >= MAX_WARNED:
        return
    _warned.add(key)
    last = "; no further unknown fields are logged" if len(_warned) == MAX_WARNED else ""
    log.warning(
        "%s: unknown request field %.100r is ignored (logged once)%s", endpoint, param, last
    )


# Fields chat and completions share.
_SAMPLING: dict[str, Rule] = {
    "model": Rule("must name the served model (404 otherwise); may be left out"),
    "stream": Rule("answers as server-sent events"),
    "stream_options": Rule(
        "`include_usage` adds a last chunk with the usage, and with `continuous_usage_stats` "
        "every chunk carries the usage so far; needs `stream`"
    ),
    "n": Rule("number of samples, sharing the prompt's KV cache"),
    "temperature": Rule("sampling temperature; 0 is greedy"),
    "top_p": Rule("nucleus sampling"),
    "stop": Rule("stop strings; a sample ends at the first one"),
    "seed": Rule("seeds the random draws; without it each sample gets a random seed"),
    "presence_penalty": Rule("penalty on tokens already in the output"),
    "frequency_penalty": Rule("penalty growing with a token's count in the output"),
    "logit_bias": Rule("added to the logits of the given token ids"),
    # Extensions (SGLang / vLLM), sent by OpenAI clients through extra_body.
    "top_k": Rule("keeps the k most likely tokens; -1 or 0: off"),
    "min_p": Rule("drops tokens below min_p × the most likely token's probability"),
    "repetition_penalty": Rule("penalty on tokens in the prompt or the output"),
    "min_tokens": Rule("stop tokens are banned until this many tokens are generated"),
    "stop_token_ids": Rule("token ids that end a sample, besides EOS"),
    "ignore_eos": Rule("EOS does not end a sample"),
    "skip_special_tokens": Rule("special tokens are left out of the text"),
    "include_stop_str_in_output": Rule("the matched stop string is kept in the text"),
    "priority": Rule("admission order under --schedule-policy priority, lowest first"),
    # Structured outputs: at most one per request.
    "response_format": Rule(
        "`json_object`, `json_schema` or `structural_tag` constrains the output; `text` does not"
    ),
    "structured_outputs": Rule(
        "vLLM's constraint: json, regex, choice, grammar, json_object or structural_tag"
    ),
    "guided_json": Rule("the output follows this JSON schema"),
    "guided_regex": Rule("the output matches this regular expression"),
    "guided_choice": Rule("the output is one of these strings"),
    "guided_grammar": Rule("the output follows this EBNF grammar"),
    "json_schema": Rule("SGLang's name: the output follows this JSON schema"),
    "regex": Rule("SGLang's name: the output matches this regular expression"),
    "ebnf": Rule("SGLang's name: the output follows this EBNF grammar"),
    # SGLang's stopping extensions.
    "stop_regex": Rule(
        "Python regular expressions; a sample ends where its text first matches one"
    ),
    "no_stop_trim": Rule("the matched stop string or regex text is kept in the text"),
    # vLLM's prompt and token extensions.
    "return_token_ids": Rule("choices carry `token_ids`, and the prompt's ids come back"),
    "truncate_prompt_tokens": Rule(
        "keeps this many prompt tokens (-1: as many as the context holds)"
    ),
    "truncation_side": Rule('"left" (default) keeps the last prompt tokens, "right" the first'),
}

# Fields that ask for what is not offered here, on both routes.
_NOT_OFFERED = {
    "use_beam_search": rejected(
        "beam search is not offered; only null or false is accepted", _null_or(False)
    ),
    "prompt_logprobs": rejected(
        "vLLM's prompt_logprobs is not offered: completions with echo and logprobs, or "
        "/generate's logprob_start_len, return the prompt's logprobs; only null is accepted"
    ),
}

_USER = {"user": Rule("end-user id for abuse monitoring; nothing is monitored here")}

CHAT = FieldTable(
    endpoint="/v1/chat/completions",
    honoured={
        **_SAMPLING,
        "messages": Rule(
            "the conversation, rendered by the model's chat template; as on OpenAI, a `system`, "
            "`developer`, `user` or `tool` message needs `content` (a string or text parts; "
            'missing or null is a 400 with `param: "messages[i].content"`), an `assistant` one '
            "may carry only `tool_calls`"
        ),
        "max_completion_tokens": Rule("output limit; wins over `max_tokens`"),
        "max_tokens": Rule("output limit; default: what the context leaves after the prompt"),
        "logprobs": Rule("returns the sampled tokens' logprobs"),
        "top_logprobs": Rule("returns this many most likely tokens per position"),
        "tools": Rule("functions the model may call, shown to it through the chat template"),
        "tool_choice": Rule(
            '"none", "auto" (answers parsed for calls), "required" or a named function '
            "(generation constrained to valid calls)"
        ),
        "parallel_tool_calls": Rule("false: at most one call per answer"),
        "functions": Rule("legacy form of `tools`"),
        "function_call": Rule("legacy form of `tool_choice`"),
        "add_generation_prompt": Rule("the chat template's assistant header ends the prompt"),
        "continue_final_message": Rule("the last assistant message is continued, not closed"),
        "chat_template_kwargs": Rule(
            "extra variables for the chat template (e.g. `enable_thinking`); "
            "names it already gets are refused"
        ),
        "echo": Rule("a last assistant message (the one continued) is put before the answer"),
    },
    no_effect={
        **_USER,
        "metadata": Rule("tags for stored completions; nothing is stored"),
        "store": Rule("nothing is stored"),
        "service_tier": Rule("there is one tier"),
        "safety_identifier": Rule("end-user id for abuse monitoring; nothing is monitored here"),
        "prompt_cache_key": Rule("the prefix cache reuses any shared prefix by itself"),
        "prompt_cache_retention": Rule("the prefix cache keeps prefixes while memory allows"),
        "prompt_cache_options": Rule("the prefix cache needs no breakpoints"),
        "reasoning_effort": Rule("not passed to the chat template; no reasoning budget applies"),
        "verbosity": Rule("not passed to the chat template"),
    },
    rejected={
        "audio": rejected("audio output is not supported; only null is accepted"),
        "modalities": rejected(
            'only text output is supported; null or ["text"] is accepted',
            _null_or(["text"]),
        ),
        "prediction": rejected("predicted outputs are not supported; only null is accepted"),
        "web_search_options": rejected("web search is not supported; only null is accepted"),
        "moderation": rejected("no moderation runs here; only null is accepted"),
        **_NOT_OFFERED,
    },
)

COMPLETIONS = FieldTable(
    endpoint="/v1/completions",
    honoured={
        **_SAMPLING,
        "prompt": Rule("text, token ids, or a batch of either"),
        "max_tokens": Rule("output limit; default 16; 0 with echo: the prompt alone"),
        "logprobs": Rule(
            "returns the sampled tokens' logprobs and this many top tokens; with echo, the "
            "prompt's too (unstreamed, n 1)"
        ),
        "echo": Rule("the prompt is put before the output text"),
    },
    no_effect=_USER,
    rejected={
        "suffix": rejected(
            'suffix insertion is not supported; only null or "" is accepted', _null_or("")
        ),
        "best_of": rejected(
            "best-of selection is not supported; only null or the value of `n` is accepted",
            _null_or_n,
        ),
        **_NOT_OFFERED,
    },
)

SAMPLING_PARAMS = FieldTable(
    endpoint="/generate",
    honoured={
        "max_new_tokens": Rule(
            "output limit; default 128; 0: the prompt alone (its logprobs with return_logprob)"
        ),
        "min_new_tokens": Rule("stop tokens are banned until this many tokens are generated"),
        "temperature": Rule("sampling temperature; 0 is greedy"),
        "top_p": Rule("nucleus sampling"),
        "top_k": Rule("keeps the k most likely tokens; -1: off"),
        "min_p": Rule("drops tokens below min_p × the most likely token's probability"),
        "presence_penalty": Rule("penalty on tokens already in the output"),
        "frequency_penalty": Rule("penalty growing with a token's count in the output"),
        "repetition_penalty": Rule("penalty on tokens in the prompt or the output"),
        "stop": Rule("stop strings; a sample ends at the first one"),
        "stop_token_ids": Rule("token ids that end a sample, besides EOS"),
        "ignore_eos": Rule("EOS does not end a sample"),
        "skip_special_tokens": Rule("special tokens are left out of the text"),
        "sampling_seed": Rule("seeds the random draws; without it each sample gets a random seed"),
        "n": Rule("number of samples, sharing the prompt's KV cache"),
        "stop_regex": Rule(
            "Python regular expressions; a sample ends where its text first matches one"
        ),
        "no_stop_trim": Rule("the matched stop string or regex text is kept in the text"),
        # Structured outputs.
        "regex": Rule("the output matches this regular expression"),
        "ebnf": Rule("the output follows this EBNF grammar"),
        "json_schema": Rule("the output follows this JSON schema"),
        "structural_tag": Rule("the output follows this structural tag"),
    },
    no_effect={},
    rejected={},
)

GENERATE = FieldTable(
    endpoint="/generate",
    honoured={
        "text": Rule("the prompt as text (or `input_ids`); a list of texts is a batch"),
        "input_ids": Rule("the prompt as token ids (or `text`); a list of id lists is a batch"),
        "sampling_params": Rule(
            "how to sample, with SGLang's names; in a batch, one object for every prompt or a "
            "list of one per prompt (all with the same n)"
        ),
        "stream": Rule("answers as server-sent events"),
        "rid": Rule(
            "the request id (a duplicate in flight is a 400); in a batch, a list of one distinct "
            "id per prompt"
        ),
        "priority": Rule("admission order under --schedule-policy priority, lowest first"),
        "return_logprob": Rule("meta_info carries the output tokens' logprobs"),
        "logprob_start_len": Rule(
            "with return_logprob: the prompt's logprobs from this position on; -1: none"
        ),
        "top_logprobs_num": Rule("with return_logprob: this many alternatives per token"),
        "return_text_in_logprobs": Rule("logprob entries carry the token's text too"),
    },
    no_effect={},
    rejected={
        "image_data": rejected("image input is not supported; only null is accepted"),
        "lora_path": rejected("LoRA adapters are not supported; only null is accepted"),
    },
    nested={"sampling_params": SAMPLING_PARAMS},
)
