"""Reasoning end to end: a chat template that opens a think section, `--reasoning-parser
deepseek-r1`, and the real model made (by a structural tag) to close it and answer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.procs import serving

pytestmark = pytest.mark.slow

# ChatML whose generation prompt opens the think section, as DeepSeek-R1's template does.
THINK_TEMPLATE = (
    "{%- for m in messages -%}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n<think>\\n' }}{%- endif -%}"
)
THOUGHT = "Two and two make four."
FORCED = {
    "type": "structural_tag",
    "format": {
        "type": "sequence",
        "elements": [
            {"type": "const_string", "value": f"{THOUGHT}</think>"},
            {"type": "regex", "pattern": "It is [0-9]\\."},
        ],
    },
}


@pytest.fixture(scope="module")
def client(
    tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path
) -> Iterator[openai.OpenAI]:
    tmp = tmp_path_factory.mktemp("reasoning")
    template = tmp / "think.jinja"
    template.write_text(THINK_TEMPLATE)
    extra = ["--reasoning-parser", "deepseek-r1", "--chat-template", str(template)]
    with serving(tmp / "serve.log", extra) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def test_think_section_goes_to_reasoning_content_whole_and_streamed(client: openai.OpenAI) -> None:
    kw = {
        "model": client.models.list().data[0].id,
        "messages": [{"role": "user", "content": "What is 2 + 2?"}],
        "temperature": 0,
        "max_tokens": 40,
        "response_format": FORCED,
    }
    message = client.chat.completions.create(**kw).choices[0].message
    extra = message.model_extra or {}
    assert extra["reasoning_content"] == extra["reasoning"] == THOUGHT
    assert message.content is not None and message.content.startswith("It is ")
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            delta = c.delta.model_extra or {}
            reasoning += delta.get("reasoning_content") or ""
            content += c.delta.content or ""
            assert "</think>" not in (c.delta.content or "") + (
                delta.get("reasoning_content") or ""
            )
    assert (reasoning, content) == (THOUGHT, message.content)
