"""Conversation templates of DeepSeek-VL2 (``deepseek``, ``deepseekv2``, ``plain``, ``alignment``).

A template renders a list of (role, message) pairs into the prompt string. The processor renders one user
turn at a time (see ``DeepseekVLV2Processor.format_messages_v2``); the whole-conversation rendering is only
returned as ``sft_format``.

With the default ``deepseek`` template a user turn followed by an empty assistant turn renders as
``"<|User|>: {content}\\n\\n<|Assistant|>:"`` (no space after the last colon).
"""
from __future__ import annotations

import dataclasses
import enum
from types import MappingProxyType
from typing import List, Mapping, Optional, Tuple

__all__ = ["SeparatorStyle", "Conversation", "UnknownTemplateError", "get_conv_template", "CONV_TEMPLATES"]

END_OF_SENTENCE = "<｜end▁of▁sentence｜>"


class UnknownTemplateError(ValueError):
    """A conversation template name that is not registered."""


class SeparatorStyle(enum.IntEnum):
    DeepSeek = 1
    DeepSeekV2 = 2
    PLAIN = 3
    ALIGNMENT = 4


@dataclasses.dataclass
class Conversation:
    """A prompt template plus the messages rendered with it.

    ``messages`` holds ``[role, message]`` pairs; an empty (or None) message marks the turn the model is to
    write. ``stop_str`` / ``stop_token_ids`` are the official values.
    """

    name: str
    system_template: str = "{system_message}"
    system_message: str = ""
    roles: Tuple[str, str] = ("USER", "ASSISTANT")
    messages: List[List[Optional[str]]] = dataclasses.field(default_factory=list)
    offset: int = 0
    sep_style: SeparatorStyle = SeparatorStyle.DeepSeek
    sep: str = "\n"
    sep2: Optional[str] = None
    stop_str: Optional[List[str]] = None
    # NOTE(port): 100001 is the eos of the small (V2) vocabulary only; tiny and full use eos id 1. Generation
    # should stop on the tokenizer's eos_token_id instead.
    stop_token_ids: Optional[List[int]] = None

    def get_prompt(self) -> str:
        """Render the system message and all messages into one string."""
        system_prompt = self.system_template.format(system_message=self.system_message)
        separators = (self.sep, self.sep2)
        if self.sep_style == SeparatorStyle.DeepSeek:
            rendered = system_prompt + self.sep if system_prompt else ""
            for index, (role, message) in enumerate(self.messages):
                if message:
                    rendered += f"{role}: {message}{separators[index % 2]}"
                else:
                    rendered += f"{role}:"
            return rendered
        if self.sep_style == SeparatorStyle.DeepSeekV2:
            rendered = system_prompt + self.sep if system_prompt else ""
            for role, message in self.messages:
                if not message:
                    continue
                # NOTE(port): the official check compares with "User" while the template's role is
                # "|<User>|", so every message gets the assistant form; kept for identical prompts.
                if role == "User":
                    rendered += "<｜sft▁begin｜>\n" + message + self.sep
                else:
                    rendered += message + self.sep2
            return rendered
        if self.sep_style == SeparatorStyle.PLAIN:
            return "".join(message + separators[i % 2] for i, (_, message) in enumerate(self.messages) if message)
        if self.sep_style == SeparatorStyle.ALIGNMENT:
            # The user turn is replaced by a bare image tag: image-caption alignment data.
            return "".join(
                ("<image>\n" if i % 2 == 0 else message) + separators[i % 2]
                for i, (_, message) in enumerate(self.messages)
                if message
            )
        raise ValueError(f"invalid separator style {self.sep_style!r} in template {self.name!r}")

    def set_system_message(self, system_message: str) -> None:
        self.system_message = system_message

    def append_message(self, role: str, message: Optional[str]) -> None:
        self.messages.append([role, message])

    def update_last_message(self, message: str) -> None:
        """Fill in the last (usually empty) turn, e.g. with the model's answer."""
        self.messages[-1][1] = message

    def reset_message(self) -> None:
        self.messages = []

    def copy(self) -> "Conversation":
        return dataclasses.replace(
            self,
            messages=[[role, message] for role, message in self.messages],
            stop_str=None if self.stop_str is None else list(self.stop_str),
            stop_token_ids=None if self.stop_token_ids is None else list(self.stop_token_ids),
        )


def _official_templates() -> Mapping[str, Conversation]:
    templates = [
        Conversation(
            name="deepseek",
            roles=("<|User|>", "<|Assistant|>"),
            sep_style=SeparatorStyle.DeepSeek,
            sep="\n\n",
            sep2=END_OF_SENTENCE,
            stop_token_ids=[100001],
            stop_str=["User:", END_OF_SENTENCE],
        ),
        Conversation(
            name="deepseekv2",
            roles=("|<User>|", "|<Assistant>|"),
            sep_style=SeparatorStyle.DeepSeekV2,
            sep="\n<｜sft▁end｜>",
            sep2=END_OF_SENTENCE,
            stop_token_ids=[100001],
            stop_str=["User:", END_OF_SENTENCE],
        ),
        Conversation(
            name="plain",
            system_template="",
            roles=("", ""),
            sep_style=SeparatorStyle.PLAIN,
            sep="",
            sep2="",
            stop_token_ids=[100001],
            stop_str=["</s>"],
        ),
        Conversation(
            name="alignment",
            system_template="",
            roles=("", ""),
            sep_style=SeparatorStyle.ALIGNMENT,
            sep="",
            sep2="",
            stop_token_ids=[100001],
            stop_str=["</s>"],
        ),
    ]
    return MappingProxyType({template.name: template for template in templates})


CONV_TEMPLATES: Mapping[str, Conversation] = _official_templates()


def get_conv_template(name: str) -> Conversation:
    """A fresh copy of the template called ``name`` (``deepseek`` is the one the checkpoints use)."""
    if name not in CONV_TEMPLATES:
        raise UnknownTemplateError(
            f"unknown conversation template {name!r}; known templates: {', '.join(sorted(CONV_TEMPLATES))}"
        )
    return CONV_TEMPLATES[name].copy()
