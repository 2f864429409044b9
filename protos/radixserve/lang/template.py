"""The text a chat template puts around each role's content, derived from the server itself.

A template is rendered for sentinel conversations and split on the sentinels:

    [system S]                        → sys_prefix S sys_suffix
    [system S, user U]                → … user_prefix U user_suffix
    [system S, user U, assistant A]   → … assistant_prefix A assistant_suffix
    [system S, user U] + gen prompt   → … generation_prompt
    [user U]                          → default_system user_prefix U user_suffix

`default_system` is what the template writes before a conversation that does not open with a
system message (SmolLM2's default system message; empty for most templates), so a program
without a system block renders as the chat route renders the same messages. The tokens the
tokenizer adds to every prompt itself (a BOS) are left out: /generate adds them to a text prompt.
This assumes a template renders each message alone, the same wherever it stands (ChatML, Llama 3,
Qwen and most others do); one that does not raises TemplateError.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
SENTINELS = {role: f"RADIXSERVESENTINEL{role.upper()}" for role in ROLES}

# (messages, add_generation_prompt) → the rendered text
Render = Callable[[list[dict[str, str]], bool], str]


class TemplateError(ValueError):
    """The server's chat template cannot be split into per-role prefixes and suffixes."""


@dataclass(frozen=True)
class ChatTemplate:
    """What goes before and after each role's content (role → text), and before a conversation
    whose first message is not a system message."""

    prefixes: dict[str, str]
    suffixes: dict[str, str]
    default_system: str = ""

    def prefix(self, role: str) -> str:
        return self._part(self.prefixes, role)

    def suffix(self, role: str) -> str:
        return self._part(self.suffixes, role)

    @staticmethod
    def _part(parts: dict[str, str], role: str) -> str:
        if role not in parts:
            raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
        return parts[role]


def derive_template(render: Render, added: str = "") -> ChatTemplate:
    """The ChatTemplate of `render`; `added` is the text of the tokens the tokenizer puts before
    every prompt (dropped from the front of each rendering). Raises TemplateError."""

    def text(roles: tuple[str, ...], generation_prompt: bool = False) -> str:
        messages = [{"role": r, "content": SENTINELS[r]} for r in roles]
        rendered = render(messages, generation_prompt)
        return rendered.removeprefix(added) if added else rendered

    t_sys = text(("system",))
    t_user = text(("system", "user"))
    t_asst = text(("system", "user", "assistant"))
    t_gen = text(("system", "user"), generation_prompt=True)
    t_alone = text(("user",))
    for longer, shorter in ((t_user, t_sys), (t_asst, t_user), (t_gen, t_user)):
        _expect(longer.startswith(shorter), "a message changes how earlier ones render")
    user_block = t_user[len(t_sys) :]
    _expect(t_alone.endswith(user_block), "the first user message renders differently")
    sys_prefix, sys_suffix = _split(t_sys, "system")
    user_prefix, user_suffix = _split(user_block, "user")
    _, asst_suffix = _split(t_asst[len(t_user) :], "assistant")
    # The chat route puts the generation prompt before an answer it generates.
    asst_prefix = t_gen[len(t_user) :]
    return ChatTemplate(
        prefixes={"system": sys_prefix, "user": user_prefix, "assistant": asst_prefix},
        suffixes={"system": sys_suffix, "user": user_suffix, "assistant": asst_suffix},
        default_system=t_alone[: len(t_alone) - len(user_block)],
    )


def _split(block: str, role: str) -> tuple[str, str]:
    parts = block.split(SENTINELS[role])
    _expect(len(parts) == 2, f"a {role} message's content is not rendered verbatim once")
    return parts[0], parts[1]


def _expect(ok: bool, why: str) -> None:
    if not ok:
        raise TemplateError(f"cannot derive role prefixes from the chat template: {why}")
