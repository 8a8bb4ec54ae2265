"""What the model sees of a prompt: plain text, or a conversation rendered by the tokenizer's chat template.

A prompt is a string or a list of messages (`{"role": ..., "content": ...}`, TRL's conversational format):

| prompt   | tokenizer has a chat template                              | no template, or --no_chat_template |
|----------|------------------------------------------------------------|------------------------------------|
| messages | the template, `add_generation_prompt=True`                 | refused (nothing can render them)  |
| string   | one user message, rendered as above                        | BOS (if any) + the text            |

`--system_prompt` replaces the conversation's system message or adds one first. The template's text is tokenized
with `add_special_tokens=False`: a template writes its own BOS (as TRL and transformers' pipelines do).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

ROLES = ("system", "user", "assistant", "tool")
Prompt = str | list[dict[str, Any]]


def check_prompt(prompt: Any) -> str | None:
    """What is wrong with a dataset row's prompt (None when it is a non-empty string or a well-formed conversation)."""
    if prompt is None:
        return "the prompt is missing"
    if isinstance(prompt, str):
        return None if prompt.strip() else "the prompt is empty"
    if not isinstance(prompt, (list, tuple)):
        return f"the prompt is a {type(prompt).__name__}, not a string or a list of messages"
    if not prompt:
        return "the prompt is an empty list of messages"
    for i, message in enumerate(prompt):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return f"message {i} is not a {{'role': ..., 'content': ...}} mapping: {message!r:.80}"
        if message["role"] not in ROLES:
            return f"message {i} has role {message['role']!r}; roles are {ROLES}"
        if not isinstance(message["content"], str) or not message["content"].strip():
            return f"message {i} ({message['role']}) has no text content"
    if not any(m["role"] == "user" for m in prompt):
        return "the conversation has no user message"
    if prompt[-1]["role"] == "assistant":
        return "the conversation ends with an assistant message: nothing is left for the model to answer"
    return None


class PromptFormat:
    """Renders prompts for one tokenizer. system_prompt: replaces or adds the system message (None: as written).
    use_chat_template: False renders plain-text prompts as text even when the tokenizer has a template."""

    def __init__(self, tokenizer, system_prompt: str | None = None, use_chat_template: bool = True) -> None:
        self.tokenizer, self.system_prompt = tokenizer, system_prompt
        self.templated = use_chat_template and getattr(tokenizer, "chat_template", None) is not None
        if system_prompt is not None and not self.templated:
            raise ValueError("--system_prompt needs a chat template: the tokenizer has none"
                             if use_chat_template else "--system_prompt cannot be used with --no_chat_template")

    def conversation(self, prompt: Prompt) -> list[dict[str, Any]] | None:
        """The messages the template renders (None: the prompt is rendered as plain text)."""
        if isinstance(prompt, str):
            if not self.templated:
                return None
            messages = [{"role": "user", "content": prompt}]
        elif not self.templated:
            raise ValueError("a conversation needs a chat template: the tokenizer has none" if
                             getattr(self.tokenizer, "chat_template", None) is None else
                             "a conversation cannot be rendered with --no_chat_template")
        else:
            messages = [dict(m) for m in prompt]
        if self.system_prompt is not None:
            rest = messages[1:] if messages[0]["role"] == "system" else messages
            messages = [{"role": "system", "content": self.system_prompt}, *rest]
        return messages

    def text(self, prompt: Prompt) -> str:
        """The prompt as the model sees it, as text (the template included; BOS excepted for plain text)."""
        messages = self.conversation(prompt)
        if messages is None:
            return prompt
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def token_ids(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids as the model sees them."""
        ids = self.tokenizer(self.text(prompt), add_special_tokens=False)["input_ids"]
        if self.conversation(prompt) is None and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id, *ids]
        return ids

    def batch(self, prompts: Sequence[Prompt], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (prompt_ids, prompt_mask), both [B, Lp], left-padded with the tokenizer's pad id."""
        rows = [self.token_ids(p) for p in prompts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        return ids.to(device), mask.to(device)
