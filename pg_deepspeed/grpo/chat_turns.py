"""The template rule of multi-turn rollouts: what the model sees at each turn is the chat template's rendering of the
whole conversation so far (`add_generation_prompt=True`), token for token, or the conversation is refused.

Each next prompt is built as the tokens already used (the prompt, the model's sampled turns, the earlier
observations) followed by the new part: the rendering of the whole conversation, with the model's last turn and the
new observations, minus what was already used. :meth:`ChatTurns.continuation` checks that the earlier tokens are
a prefix of that rendering, in tokens (the exact case), else in text where the model's own tokens are not the
tokenizer's canonical split of their text (the model's sampled tokens are kept as sampled: they are what it is
trained on), with the new part tokenizing the same alone as at the end of the whole rendering. A conversation that
fails is refused with :class:`TemplateBreakError`, naming the conversation and turn: an observation holding the
template's own special tokens (which would close the turn early or open a turn nobody wrote), a template that
re-renders earlier turns differently (dropping reasoning, trimming whitespace), a turn ended by a token the template
does not end turns with.

The model's turn goes into the conversation as an assistant message whose content is the decoded text of its
sampled tokens without the end-of-turn (EOS) token; tool calls stay in that text as the model wrote them (never
rewritten to a structured `tool_calls` field, which templates render differently). Observations with the role `tool`
become `user` messages under a template that has no tool role (one whose source never names `'tool'`, e.g.
SmolLM2's ChatML). The environment's `tools` are given to templates whose source reads `tools`.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

from pg_deepspeed.grpo.prompts import PromptFormat

_TOOL_ROLE = re.compile(r"""['"]tool['"]""")


class TemplateBreakError(ValueError):
    """A conversation whose next prompt would not be the chat template's rendering of it; names the conversation."""


class ChatTurns:
    """Renders and extends conversations for one tokenizer and its chat template.

    prompt_format: the run's (its tokenizer, template and --system_prompt); tools: the environment's tool schemas."""

    def __init__(self, prompt_format: PromptFormat, tools: Sequence[dict] | None = None) -> None:
        if not prompt_format.templated:
            raise ValueError("--environment needs a chat template: the tokenizer has none" if
                             getattr(prompt_format.tokenizer, "chat_template", None) is None else
                             "--environment cannot be used with --no_chat_template: conversations need the template")
        self.format, self.tokenizer = prompt_format, prompt_format.tokenizer
        template = self.tokenizer.chat_template
        source = template if isinstance(template, str) else " ".join(map(str, dict(template).values()))
        self.renders_tools = "tools" in source
        self.tool_role = "tool" if _TOOL_ROLE.search(source) else "user"
        self.tools = list(tools) if tools and self.renders_tools else None
        self.eos_id = self.tokenizer.eos_token_id
        # the special tokens' texts (role markers, end-of-turn): an observation must not hold one
        self.special = sorted({t for t in self.tokenizer.all_special_tokens if t})

    def first_messages(self, messages: list[dict]) -> list[dict]:
        """The environment's first messages with --system_prompt applied (as PromptFormat applies it)."""
        return self.format.conversation(messages)

    def render(self, messages: list[dict]) -> str:
        """The template's text of `messages` with the generation prompt (the next assistant turn's header)."""
        return self.tokenizer.apply_chat_template(messages, tools=self.tools, add_generation_prompt=True,
                                                  tokenize=False)

    def encode(self, text: str) -> list[int]:
        """Token ids of template text (the template writes its own BOS: no special tokens added)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids, special tokens kept, no clean-up (decode(encode(text)) == text)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The first prompt: the rendering of the first messages, [Lp] ids."""
        return self.encode(self.render(messages))

    def assistant_message(self, sampled: Sequence[int]) -> tuple[dict[str, str], bool]:
        """The model's turn (its sampled ids) as a message, and whether it ended the turn itself (sampled EOS)."""
        ended = len(sampled) > 0 and sampled[-1] == self.eos_id
        return {"role": "assistant", "content": self.decode(sampled[:-1] if ended else sampled)}, ended

    def observations(self, messages: list[dict], where: str) -> list[dict]:
        """An environment's observation messages as they enter the conversation: `tool` becomes `user` under a
        template without a tool role; refused (TemplateBreakError) when one holds a special token of the tokenizer."""
        out = []
        for i, message in enumerate(messages):
            content = message["content"]
            found = min((t for t in self.special if t in content), key=content.index, default=None)
            if found is not None:
                raise TemplateBreakError(
                    f"{where}: observation {i} ({message['role']}) contains the special token {found!r}, which the "
                    "chat template uses to delimit turns: it would close the turn early or open one nobody wrote; "
                    "the conversation is refused")
            role = self.tool_role if message["role"] == "tool" else message["role"]
            out.append({**message, "role": role})
        return out

    def continuation(self, used: Sequence[int], messages: list[dict], where: str) -> list[int]:
        """The tokens to append to `used` (every token of the conversation so far: prompt, turns, observations) so
        that the model sees the template's rendering of `messages` (which end with the new observations, or with the
        model's last turn) with the next assistant header. TemplateBreakError naming `where` when `used` is not the
        beginning of that rendering."""
        text = self.render(messages)
        full = self.encode(text)
        n = len(used)
        if full[:n] == list(used):
            return full[n:]
        # the model's own tokens need not be the canonical split of their text: compare the text, then check that
        # the new part tokenizes the same on its own as at the end of the whole rendering
        before = self.decode(used)
        if not text.startswith(before):
            at = next((i for i, (a, b) in enumerate(zip(before, text)) if a != b), min(len(before), len(text)))
            raise TemplateBreakError(
                f"{where}: the chat template's rendering of the conversation no longer begins with the tokens the "
                f"model already saw (they differ at character {at}: {before[at:at + 40]!r} was used, the template "
                f"now renders {text[at:at + 40]!r}); a template that re-renders earlier turns differently, or a turn "
                "ended by a token the template does not end turns with, cannot be trained as one conversation; "
                "refused")
        new = self.encode(text[len(before):])
        if new and full[len(full) - len(new):] != new:
            raise TemplateBreakError(
                f"{where}: the template's new text {text[len(before):][:40]!r} tokenizes differently after the "
                "conversation than on its own (its tokens merge with the model's last ones); refused")
        return new


def message_text(messages: list[dict[str, Any]]) -> str:
    """A conversation as plain text, one `role: content` block per message (for logs and completions.jsonl)."""
    return "\n".join(f"[{m['role']}] {m['content']}" for m in messages)
