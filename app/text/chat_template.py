"""Render a model's Jinja chat template (from the GGUF's ``tokenizer.chat_template``) into a prompt string.

The template runs the way Hugging Face transformers runs it (``apply_chat_template``), so a template written for
transformers renders the same here:

- ``jinja2.sandbox.ImmutableSandboxedEnvironment`` with ``trim_blocks`` and ``lstrip_blocks``; the template cannot
  reach Python internals or mutate its inputs (both raise ``jinja2.sandbox.SecurityError``);
- the ``loopcontrols`` extension (``break``/``continue``) and a ``{% generation %}`` block that renders its body;
- globals ``raise_exception(message)`` and ``strftime_now(format)``, and a ``tojson`` filter that keeps non-ASCII
  characters as they are (``ensure_ascii=False``), unlike Jinja's built-in one;
- variables ``messages``, ``add_generation_prompt``, ``bos_token`` and ``eos_token``.

One deliberate difference: Jinja's sandbox turns an unsafe attribute (``x.__class__``) into an undefined value
that renders as an empty string and only fails when used further; here the access itself raises
``SecurityError``, so a probing template fails loudly instead of rendering quietly.

Brook never writes the prompt format (ChatML or any other) by hand: the model's own template decides it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

logger = logging.getLogger(__name__)

MESSAGE_ROLES = frozenset({"system", "user", "assistant", "tool"})
# Keys a message may carry besides role and content; all are strings.
OPTIONAL_MESSAGE_KEYS = frozenset({"name", "tool_call_id"})


class ChatMessageError(ValueError):
    """A chat message is malformed (wrong type, unknown role, content that is not a string...)."""


class ChatTemplateError(ValueError):
    """The chat template failed to compile or to render; ``__cause__`` holds the Jinja error."""


class _TemplateRaisedError(Exception):
    """Raised by the template's ``raise_exception``; becomes a ChatTemplateError."""


class _GenerationBlockExtension(Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; here it just renders."""

    tags = {"generation"}  # noqa: RUF012 - Jinja's Extension API declares tags as a class attribute

    def parse(self, parser: Parser) -> list[nodes.Node]:
        next(parser.stream)
        body: list[nodes.Node] = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return body


class _StrictSandboxEnvironment(ImmutableSandboxedEnvironment):
    """Immutable sandbox in which reading an unsafe attribute raises at once."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


def _raise_exception(message: str) -> NoReturn:
    raise _TemplateRaisedError(message)


def _strftime_now(date_format: str) -> str:
    return datetime.now().strftime(date_format)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = _StrictSandboxEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlockExtension, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Check chat messages and return plain-dict copies of them.

    Each message needs a ``role`` (system, user, assistant or tool) and a string ``content``; it may also have
    a string ``name`` or ``tool_call_id``.
    """
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise ChatMessageError(f"messages should be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ChatMessageError("messages is empty; a chat needs at least one message")
    checked: list[dict[str, str]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatMessageError(f"message {index} should be an object, got {type(message).__name__}")
        role = message.get("role")
        if role not in MESSAGE_ROLES:
            raise ChatMessageError(f"message {index} has role {role!r}; expected one of {sorted(MESSAGE_ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise ChatMessageError(f"message {index} content should be a string, got {type(content).__name__}")
        unknown = set(message) - {"role", "content"} - OPTIONAL_MESSAGE_KEYS
        if unknown:
            raise ChatMessageError(
                f"message {index} has unknown keys {sorted(map(str, unknown))}; "
                f"allowed: role, content, {', '.join(sorted(OPTIONAL_MESSAGE_KEYS))}"
            )
        copy = {"role": str(role), "content": content}
        for key in OPTIONAL_MESSAGE_KEYS & set(message):
            value = message[key]
            if not isinstance(value, str):
                raise ChatMessageError(f"message {index} {key} should be a string, got {type(value).__name__}")
            copy[key] = value
        checked.append(copy)
    return checked


class ChatTemplate:
    """A compiled chat template. Rendering is thread-safe; compile once per model."""

    def __init__(self, source: str) -> None:
        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError("chat template is empty; the model has no `tokenizer.chat_template`")
        self._source = source
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as error:
            raise ChatTemplateError(f"chat template does not compile: {error}") from error

    @property
    def source(self) -> str:
        return self._source

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        bos_token: str = "",
        eos_token: str = "",
    ) -> str:
        """The prompt text for these messages; with ``add_generation_prompt`` it ends where the reply begins."""
        checked = validate_messages(messages)
        try:
            return self._template.render(
                messages=checked,
                add_generation_prompt=add_generation_prompt,
                bos_token=bos_token,
                eos_token=eos_token,
            )
        except _TemplateRaisedError as error:
            raise ChatTemplateError(f"chat template rejected the messages: {error}") from error
        except jinja2.TemplateError as error:
            raise ChatTemplateError(f"chat template failed to render: {type(error).__name__}: {error}") from error
