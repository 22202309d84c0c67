"""The text of each segment (prefix, worker turn, synthesizer turn), cut from the model's own chat template.

A fork renders as one conversation: [system, user question] is the shared prefix; each branch is a
turn (an optional user role instruction, then the assistant's answer, closed by the end-of-turn
token); the synthesizer's prompt is a last user turn plus the generation prompt. Segments are cut
right after each end-of-turn token, so [prefix, branch 1, ..., branch N, synthesizer] concatenated is
exactly what the template renders for the whole conversation.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

_MARK = "\x00parsyn-answer\x00"

# "{question}" is filled in with the fork's question.
DEFAULT_INSTRUCTION = "Using the answers above, answer the question: {question}"


@dataclass(frozen=True)
class ChatFormat:
    """Renders segments for one tokenizer; plain text when it has no chat template (base models)."""

    tokenizer: PreTrainedTokenizerBase

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
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    def _opening(self, question: str, system: str | None) -> list[dict]:
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
        messages = self._opening(question, system) + [
            {"role": "assistant", "content": _MARK},
            {"role": "user", "content": instruction.replace("{question}", question)},
        ]
        rest = self._render(messages, generation=True).split(_MARK, 1)[1]
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
