"""Incremental detokenization with stop strings, shared by the offline API and the HTTP front."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class TextStream:
    """Turns a growing list of token ids into text deltas; stops at the first stop string.

    Text that could still become the start of a stop string, or an incomplete UTF-8 character,
    is held back until it is known to be safe to send.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.token_ids: list[int] = []
        self.text = ""  # everything decoded so far (up to a stop string)
        self.sent = 0  # characters of `text` already returned
        self.stopped = False

    def add(self, token_ids: list[int]) -> str:
        """Add tokens; return the text that is now safe to emit."""
        if self.stopped:
            return ""
        self.token_ids.extend(token_ids)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        hold = 0
        if text.endswith("\ufffd"):
            hold = 1
        for s in self.stop:
            idx = text.find(s, max(0, self.sent - len(s)))
            if idx != -1:
                self.text = text[:idx]
                self.stopped = True
                return self._emit(len(self.text))
        if self.stop:
            hold = max(hold, max(len(s) for s in self.stop) - 1)
        self.text = text
        return self._emit(max(self.sent, len(text) - hold))

    def flush(self) -> str:
        """At the end of generation: emit whatever was held back (a broken last character too:
        no more bytes will come to complete it, and the text then equals a plain decode)."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        delta = self.text[self.sent : upto]
        self.sent = max(self.sent, upto)
        return delta
