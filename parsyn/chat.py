"""The text of each segment (prefix, worker turn, synthesizer turn), cut from the model's own chat template.

A fork renders as one conversation: [system, user question] is the shared prefix; each branch is a
turn (an optional user role instruction, then the assistant's answer, closed by the end-of-turn
token); the synthesizer's prompt is a last user turn plus the generation prompt. Segments are cut
right after each end-of-turn token, so [prefix, branch 1, ..., branch N, synthesizer] concatenated is
exactly what the template renders for the whole conversation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

_MARK = "\x00parsyn-answer\x00"

# "{question}" is filled in with the fork's question.
DEFAULT_INSTRUCTION = "Using the answers above, answer the question: {question}"


# The text protocol for tool calls where the chat template has none (the tags Qwen2.5 and Hermes use).
TOOL_PROTOCOL = (
    "You may call tools. Their signatures, as JSON schemas:\n{schemas}\n"
    "To call one, write a line <tool_call>{{\"name\": <tool name>, \"arguments\": <JSON object>}}</tool_call> "
    "and end your turn; its result comes back as <tool_response>...</tool_response>. "
    "When you know the answer, write it without a tool call."
)


@dataclass(frozen=True)
class ChatFormat:
    """Renders segments for one tokenizer; plain text when it has no chat template (base models).

    With `tools` (OpenAI's function schemas) the conversation offers them: through the template's own
    tool support where it has one (Qwen2.5's renders them into the system turn), else by `TOOL_PROTOCOL`
    appended to the system prompt; tool results follow in `tool_results`."""

    tokenizer: PreTrainedTokenizerBase
    tools: tuple[dict, ...] = ()

    @cached_property
    def native_tools(self) -> bool:
        """The template itself renders tools (it changes when given them); probed once per format."""
        if not self.tools or self.tokenizer.chat_template is None:
            return False
        probe = [{"role": "user", "content": "?"}]
        render = self.tokenizer.apply_chat_template
        return render(probe, tokenize=False) != render(probe, tools=list(self.tools), tokenize=False)

    @property
    def end(self) -> str:
        return self.tokenizer.eos_token or ""

    def ids(self, text: str) -> tuple[int, ...]:
        """Token ids of a rendered segment (no special tokens added: the template has them)."""
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prefix_ids(self, question: str, system: str | None = None) -> tuple[int, ...]:
        return self.ids(self.prefix(question, system))

    def synthesis_ids(self, question: str, system: str | None,
                      instruction: str = DEFAULT_INSTRUCTION) -> tuple[int, ...]:
        return self.ids(self.synthesis(question, system, instruction))

    def chat_ids(self, messages: list[dict]) -> tuple[int, ...]:
        """A whole conversation ([{"role", "content"}, ...]) rendered up to the assistant's turn."""
        return self.ids(self._render(messages, generation=True))

    def _render(self, messages: list[dict], generation: bool) -> str:
        if self.tokenizer.chat_template is None:
            return _plain(messages, generation, self.end)
        extra = {"tools": list(self.tools)} if self.tools and self.native_tools else {}
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation, **extra)

    def _opening(self, question: str, system: str | None) -> list[dict]:
        if self.tools and not self.native_tools:
            schemas = "\n".join(json.dumps(t, ensure_ascii=False) for t in self.tools)
            system = "\n\n".join(p for p in (system, TOOL_PROTOCOL.format(schemas=schemas)) if p)
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]

    def prefix(self, question: str, system: str | None = None) -> str:
        """System + question, up to and including the question turn's end-of-turn token."""
        full = self._render(self._opening(question, system), generation=False)
        cut = full.rfind(self.end) + len(self.end) if self.end and self.end in full else len(full)
        return full[:cut]

    def turn(self, question: str, system: str | None, role: str | None) -> str:
        """A worker's opening after the prefix: its role instruction (if any) and the assistant header."""
        messages = self._opening(question, system) + ([{"role": "user", "content": role}] if role else [])
        return self._after_prefix(self._render(messages, generation=True), question, system)

    def branch(self, question: str, system: str | None, role: str | None, text: str) -> str:
        """A whole branch from a ready answer text: its opening, the text and the end-of-turn token."""
        return self.turn(question, system, role) + text + self.end

    def synthesis(self, question: str, system: str | None, instruction: str) -> str:
        """The synthesizer's own prompt after the last branch: its instruction turn (where "{question}"
        stands for the question) and the assistant header."""
        return self.follow_up(question, system, instruction.replace("{question}", question))

    def follow_up(self, question: str, system: str | None, text: str) -> str:
        """What follows an assistant turn (after its end-of-turn token): a user turn holding `text` and the
        assistant header of the answer."""
        messages = self._opening(question, system) + [
            {"role": "assistant", "content": _MARK}, {"role": "user", "content": text}]
        return self._after_turn(self._render(messages, generation=True))

    def tool_results(self, question: str, system: str | None, results: list[str]) -> str:
        """What follows an assistant turn that called tools (after its end-of-turn token): the turn
        carrying `results` (one per call, in order) and the assistant header of the next turn."""
        if self.native_tools:
            answers = [{"role": "tool", "content": r} for r in results]
        else:
            wrapped = "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in results)
            answers = [{"role": "user", "content": wrapped}]
        messages = self._opening(question, system) + [{"role": "assistant", "content": _MARK}, *answers]
        return self._after_turn(self._render(messages, generation=True))

    def _after_turn(self, rendered: str) -> str:
        rest = rendered.split(_MARK, 1)[1]
        if self.end and rest.startswith(self.end):
            return rest[len(self.end) :]
        return rest

    def _after_prefix(self, full: str, question: str, system: str | None) -> str:
        head = self.prefix(question, system)
        if not full.startswith(head):
            raise ValueError("the model's chat template re-renders earlier turns; parsyn cannot cut it into segments")
        return full[len(head) :]


def _plain(messages: list[dict], generation: bool, end: str) -> str:
    text = "".join(f"{m['role'].capitalize()}: {m['content']}{end}\n" for m in messages)
    return text + ("Assistant: " if generation else "")
