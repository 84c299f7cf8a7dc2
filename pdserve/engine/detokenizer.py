"""Incremental detokenization with stop strings, shared by the offline API and the HTTP front.

The text of a stream is always exactly `tokenizer.decode(ids, skip_special_tokens=True)` of the ids
received (cut at the first stop string). Instead of decoding all ids on every token (quadratic in the
output length), only a short window of recent ids is decoded, as vLLM does: the window's first ids
(its "prefix") are decoded too and their text is cut off, so decoders that treat the first token
specially (SentencePiece's leading space) give the same text as inside the whole sequence.

Text is final ("committed") only up to a point that later ids cannot change:
- not inside an incomplete UTF-8 character (the decoded text ends with U+FFFD);
- not inside a run of byte-fallback tokens (`<0xE4>` ...): such a decoder decodes the whole run at once
  and turns all of it into U+FFFD if any byte of it is invalid, so a later byte can change the run.
A tokenizer whose decode is not local at all (slow tokenizers, `clean_up_tokenization_spaces` that is
really applied) is decoded whole every time, as before.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))


def _decoder(tokenizer: PreTrainedTokenizerBase) -> tuple[Callable[[list[int]], str], bool]:
    """(decode function, whether it may be applied to a window of ids)."""
    full: Callable[[list[int]], str] = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return full, False
    fast: Callable[[list[int]], str] = lambda ids: backend.decode(ids, skip_special_tokens=True)  # noqa: E731
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        # transformers may or may not apply the clean-up (it skips it for BPE models): ask it.
        probe = tokenizer.encode("a . b , c", add_special_tokens=False)
        raw = fast(probe)
        if " ." not in raw or full(probe) != raw:
            return full, False
    return fast, True


def _byte_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Ids of byte-fallback tokens `<0x00>`..`<0xFF>` (none in byte-level BPE vocabularies)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust vocabulary, much faster than transformers' lookup
        if backend.token_to_id(BYTE_TOKENS[0x41]) is None:  # no byte tokens at all: the usual case
            return frozenset()
        return frozenset(i for i in map(backend.token_to_id, BYTE_TOKENS) if i is not None)
    unk = tokenizer.unk_token_id
    ids = map(tokenizer.convert_tokens_to_ids, BYTE_TOKENS)
    return frozenset(i for i in ids if isinstance(i, int) and i != unk)


class TextStream:
    """Turns a growing list of token ids into text deltas; stops at the first stop string.

    Text that could still become the start of a stop string, or an incomplete character, is held
    back until it is known to be safe to send. Cost per token: decoding a window of a few ids.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self._lookback = max((len(s) for s in self.stop), default=0)
        self._decode, self.windowed = _decoder(tokenizer)
        # Ids that may belong to a run of byte tokens still open: the byte tokens, and the special
        # tokens that decoding skips (the bytes on both sides of one are decoded as one run).
        self._run_ids = _byte_ids(tokenizer)
        if self._run_ids:
            self._run_ids |= frozenset(tokenizer.all_special_ids)
        self.token_ids: list[int] = []
        self.stopped = False
        self.sent = 0  # characters of the text already returned
        self._out: list[str] = []  # the text returned, in pieces
        # The window: ids[_p:_r] are its prefix (text `_prefix`), ids[_r:] are new; the text of
        # ids[:_r] is final and `_base` characters long.
        self._p = self._r = self._base = 0
        self._prefix = ""
        # text[_a:] as of the last `add`: what stop strings are searched in and deltas cut from.
        self._a = 0
        self._view = ""

    @property
    def text(self) -> str:
        """Everything decoded so far (up to a stop string), sent or not."""
        return "".join(self._out) + self._view[self.sent - self._a :]

    def add(self, token_ids: list[int]) -> str:
        """Add tokens; return the text that is now safe to emit."""
        if self.stopped:
            return ""
        self.token_ids.extend(token_ids)
        open_from = self._update_view()
        for s in self.stop:
            idx = self._view.find(s, max(0, self.sent - len(s) - self._a))
            if idx != -1:
                self._view = self._view[:idx]
                self.stopped = True
                return self._emit(self._a + idx)
        # Text is final up to an unfinished character (trailing U+FFFD) or an open byte run; of
        # that, the last characters could still begin a stop string that later text completes.
        final = min(self._a + len(self._view.rstrip(REPLACEMENT)), open_from)
        upto = final - max(0, self._lookback - 1)
        delta = self._emit(upto)
        self._trim()
        return delta

    def flush(self) -> str:
        """At the end of generation: emit whatever was held back (a broken last character too:
        no more bytes will come to complete it, and the text then equals a plain decode)."""
        return self._emit(self._a + len(self._view))

    # ---- internals --------------------------------------------------------------------------
    def _update_view(self) -> int:
        """Decode the window; set `_view` to text[_a:]; commit what is final. Returns where (in
        the text) an open byte-fallback run starts, or the text's end."""
        ids = self.token_ids
        n = len(ids)
        s = n  # ids[s:] are an open byte-fallback run, which a later byte can still change
        while s > self._r and ids[s - 1] in self._run_ids:
            s -= 1
        if self.windowed:
            closed = self._decode(ids[self._p : s]) if s > self._r else self._prefix
            whole = self._decode(ids[self._p : n]) if n > s else closed
            if not (closed.startswith(self._prefix) and whole.startswith(closed)):
                # Not a local decoder after all: decode everything, from now on.
                self.windowed = False
                self._p = self._r = self._base = self._a = 0
                s = n
                while s > 0 and ids[s - 1] in self._run_ids:
                    s -= 1
        if not self.windowed:
            self._view = self._decode(ids)
            return len(self._decode(ids[:s])) if s < n else len(self._view)
        new = closed[len(self._prefix) :]
        self._view = self._view[: self._base - self._a] + whole[len(self._prefix) :]
        open_from = self._base + len(new)
        if s > self._r and new and not new.endswith(REPLACEMENT):
            # ids[:s] decode to final text: move the window on (keeping a prefix that has text,
            # or a decoder that strips the first token's space would strip a real one).
            prefix = self._decode(ids[self._r : s])
            if prefix:
                self._p, self._prefix = self._r, prefix
            else:
                self._prefix = closed
            self._r = s
            self._base += len(new)
        return open_from

    def _emit(self, upto: int) -> str:
        delta = self._view[self.sent - self._a : upto - self._a] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        if delta:
            self._out.append(delta)
        return delta

    def _trim(self) -> None:
        """Keep only the text a later stop search or emission can still need."""
        a = max(self._a, min(self.sent, self._base) - self._lookback)
        if a > self._a and self.windowed:
            self._view = self._view[a - self._a :]
            self._a = a
