"""Role prefixes and suffixes derived from chat templates rendered in process (no server)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from radixserve.lang.template import SENTINELS, TemplateError, derive_template


def jinja_render(tokenizer):
    def render(messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    return render


def test_smollm2_template_has_chatml_roles_and_its_default_system_message(
    default_model_dir: Path,
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    template = derive_template(jinja_render(tokenizer))
    for role in ("system", "user", "assistant"):
        assert template.prefix(role) == f"<|im_start|>{role}\n"
        assert template.suffix(role) == "<|im_end|>\n"
    assert template.default_system.startswith("<|im_start|>system\nYou are a helpful AI")
    assert template.default_system.endswith("<|im_end|>\n")
    # Rebuilt from the parts, a conversation renders exactly as the template renders it.
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False)
    rebuilt = template.default_system + "".join(
        template.prefix(m["role"]) + m["content"] + template.suffix(m["role"]) for m in messages
    )
    assert rebuilt == expected
    with pytest.raises(ValueError, match="unknown role 'tool'"):
        template.prefix("tool")


def llama3_like(messages: list[dict[str, str]], generation_prompt: bool) -> str:
    text = "<|begin_of_text|>"
    for m in messages:
        text += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
    return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if generation_prompt else "")


def test_the_bos_the_tokenizer_adds_itself_is_left_out() -> None:
    template = derive_template(llama3_like, added="<|begin_of_text|>")
    assert template.prefix("user") == "<|start_header_id|>user<|end_header_id|>\n\n"
    assert template.suffix("assistant") == "<|eot_id|>"
    assert template.default_system == ""


def mistral_like(messages: list[dict[str, str]], generation_prompt: bool) -> str:
    # The system message is folded into the first user message: no per-role split exists.
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    text = "<s>"
    for m in messages:
        if m["role"] == "user":
            text += f"[INST] {system + chr(10) if system else ''}{m['content']} [/INST]"
        elif m["role"] == "assistant":
            text += m["content"] + "</s>"
    return text


def test_a_template_without_per_role_blocks_is_refused() -> None:
    with pytest.raises(TemplateError, match="cannot derive role prefixes"):
        derive_template(mistral_like)


def test_sentinels_are_distinct_words() -> None:
    assert len(set(SENTINELS.values())) == 3
