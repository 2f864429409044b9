"""Local token counting with the model's own tokenizer (the server's word is never trusted)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.common.model_store import resolve_model_path


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    content: str

    def to_json(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


class TokenCounter:
    """Counts the tokens of prompts, chat conversations and generated text."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        special = set(tokenizer.all_special_ids)
        # ids random prompts are drawn from: the whole vocabulary but special tokens
        self.ordinary_ids = [i for i in range(len(tokenizer)) if i not in special]

    @classmethod
    def load(cls, model_path: str) -> TokenCounter:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(resolve_model_path(model_path)))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def count_text(self, text: str) -> int:
        return len(self.encode(text))

    def count_prompt(self, prompt: str) -> int:
        """Tokens of a /v1/completions prompt, as a server encodes it (special tokens included)."""
        return len(self.tokenizer.encode(prompt))

    def count_messages(self, messages: Sequence[Message]) -> int:
        """Tokens of a /v1/chat/completions conversation after the chat template."""
        if getattr(self.tokenizer, "chat_template", None) is None:
            return self.count_prompt("\n\n".join(m.content for m in messages))
        text = self.tokenizer.apply_chat_template(
            [m.to_json() for m in messages], tokenize=False, add_generation_prompt=True
        )
        return self.count_text(text)
