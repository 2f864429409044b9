"""Which Jinja template renders a chat request: built-in templates, and the fallback for tools.

Built-in templates are the files in `templates/`, named by their stem (`--chat-template tool_chat`).
Many small models' templates ignore `tools`, so the model would never see them; `ToolFallback`
notices (rendering with and without the tools gives the same text) and renders such requests with
`tool_chat` instead.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jinja2.defaults import DEFAULT_NAMESPACE

log = logging.getLogger("radixserve.tokenizer")

TEMPLATE_DIR = Path(__file__).with_name("templates")
BUILTIN_TEMPLATES = tuple(sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja")))
TOOL_CHAT = "tool_chat"
# Variables transformers gives every template besides the caller's (Jinja's own globals too).
TEMPLATE_VARS = frozenset(
    {"messages", "tools", "documents", "add_generation_prompt", "raise_exception", "strftime_now"}
) | frozenset(DEFAULT_NAMESPACE)


def builtin_template(name: str) -> str:
    return (TEMPLATE_DIR / f"{name}.jinja").read_text()


def read_chat_template(name_or_path: str) -> str:
    """The text of a built-in template by name, else of the template file at the path."""
    if name_or_path in BUILTIN_TEMPLATES:
        return builtin_template(name_or_path)
    return Path(name_or_path).expanduser().read_text()


def reserved_template_vars(hf: Any) -> frozenset[str]:
    """Names `chat_template_kwargs` may not use: variables the template already gets (special
    tokens included), and apply_chat_template's parameters, which transformers would take."""
    params = inspect.signature(hf.apply_chat_template).parameters.values()
    own = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return TEMPLATE_VARS | own | set(hf.special_tokens_map)


class ToolFallback:
    """Remembers, per template text, whether it ignores `tools`; safe to call from many threads."""

    def __init__(self) -> None:
        self.template = builtin_template(TOOL_CHAT)
        self._ignores: dict[str, bool] = {}
        self._lock = threading.Lock()
        self._logged = False

    def ignores_tools(self, template: str, renders_same: Callable[[], bool]) -> bool:
        """Whether `template` ignores tools; `renders_same` (with vs. without them) decides once."""
        ignores = self._ignores.get(template)
        if ignores is None:
            # Two threads may both decide on first use; the verdict stored first wins.
            ignores = self._ignores.setdefault(template, renders_same())
        if ignores:
            self._log_once()
        return ignores

    def _log_once(self) -> None:
        with self._lock:
            if self._logged:
                return
            self._logged = True
        log.info(
            "the chat template ignores `tools` (a request renders the same with and without them): "
            "requests with tools are rendered with the built-in %s template instead (logged once)",
            TOOL_CHAT,
        )
