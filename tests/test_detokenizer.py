"""TextStream: incremental text equals a full decode, for every tokenizer kind, with stop strings."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from pdserve.engine.detokenizer import TextStream
from pdserve.model.tokenizer import load_tokenizer


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style tokenizer (Llama 2, Mistral): `▁` for spaces, `<0xNN>` byte tokens,
    a decoder that strips the first space; plus one added token that is not special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁"]
    pieces += [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["é", "中"]
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("o", "p")]
    pieces += ["".join(m) for m in merges]
    tok = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, merges, unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.add_tokens(["<tool>"])
    return fast


@pytest.fixture(scope="module")
def tokenizers(tiny_models: dict[str, Path]) -> dict[str, PreTrainedTokenizerBase]:
    toks = {arch: load_tokenizer(str(path)) for arch, path in tiny_models.items()}
    toks["demo"] = load_tokenizer("demo")
    toks["byte_fallback"] = byte_fallback_tokenizer()
    return toks


def stream_text(tok: PreTrainedTokenizerBase, ids: list[int], chunks: list[int],
                stop: list[str] | None = None) -> tuple[str, TextStream]:
    """Feed `ids` in pieces of the given sizes; return all text emitted (flushed at the end)."""
    s = TextStream(tok, stop)
    out, i, k = [], 0, 0
    while i < len(ids) and not s.stopped:
        n = chunks[k % len(chunks)]
        out.append(s.add(ids[i : i + n]))
        i, k = i + n, k + 1
    out.append(s.flush())
    return "".join(out), s


def oracle(tok: PreTrainedTokenizerBase, ids: list[int], chunks: list[int], stop: list[str]) -> str:
    """What the stream must say: the full decode, cut at the first add whose full decode holds a
    stop string (the first listed such string wins)."""
    i, k = 0, 0
    while i < len(ids):
        i, k = i + chunks[k % len(chunks)], k + 1
        text = tok.decode(ids[:i], skip_special_tokens=True)
        for s in stop:
            if s in text:
                return text[: text.find(s)]
    return tok.decode(ids, skip_special_tokens=True)


def biased_ids(tok: PreTrainedTokenizerBase, rng: random.Random, n: int) -> list[int]:
    """Random ids, with extra special tokens, byte tokens and multi-byte characters."""
    vocab = len(tok)
    pool = list(tok.all_special_ids) + list(tok.convert_tokens_to_ids(["<tool>"]) if "<tool>" in tok.get_vocab() else [])
    byte_tokens = [i for i in (tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256))
                   if isinstance(i, int) and i != tok.unk_token_id]
    cjk = tok.encode("中文 é ü €  😀", add_special_tokens=False)
    out: list[int] = []
    while len(out) < n:
        r = rng.random()
        if r < 0.1:
            out.append(rng.choice(pool))
        elif r < 0.3 and byte_tokens:
            # a valid or broken multi-byte character as byte tokens
            b = list(rng.choice(["中", "é", "😀", "€"]).encode())
            if rng.random() < 0.3:
                b = b[: rng.randrange(1, len(b) + 1)]
            out += [byte_tokens[x] for x in b]
        elif r < 0.45:
            out += cjk[: rng.randrange(1, len(cjk) + 1)]
        else:
            out.append(rng.randrange(vocab))
    return out


KINDS = ["llama", "qwen2", "qwen3", "mistral", "demo", "byte_fallback"]


@pytest.mark.parametrize("kind", KINDS)
def test_incremental_text_equals_full_decode(tokenizers: dict[str, PreTrainedTokenizerBase], kind: str) -> None:
    tok = tokenizers[kind]
    rng = random.Random(kind)
    for trial in range(150):
        ids = biased_ids(tok, rng, rng.randrange(1, 60))
        chunks = [rng.choice([1, 1, 1, 2, 3, 7])] if trial % 2 else [1]
        got, s = stream_text(tok, ids, chunks)
        want = tok.decode(ids, skip_special_tokens=True)
        assert got == want, (kind, ids, chunks)
        assert s.text == want
        assert s.windowed, "fell back to decoding everything"


@pytest.mark.parametrize("kind", KINDS)
def test_stop_strings_match_full_decode(tokenizers: dict[str, PreTrainedTokenizerBase], kind: str) -> None:
    tok = tokenizers[kind]
    rng = random.Random("stop" + kind)
    for _ in range(150):
        ids = biased_ids(tok, rng, rng.randrange(2, 60))
        full = tok.decode(ids, skip_special_tokens=True)
        stop = []
        for _ in range(rng.randrange(1, 3)):
            a = rng.randrange(len(full) + 1)
            stop.append(full[a : a + rng.randrange(1, 6)] or "zz")
        chunks = [rng.choice([1, 2, 5])]
        got, s = stream_text(tok, ids, chunks, stop)
        assert got == oracle(tok, ids, chunks, stop), (kind, ids, stop, chunks)
        assert s.text == got


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_random_sequences(tokenizers: dict[str, PreTrainedTokenizerBase], data: st.DataObject) -> None:
    """Hypothesis: any ids, any split into adds, any stop strings: the stream says the oracle's text."""
    tok = tokenizers[data.draw(st.sampled_from(KINDS))]
    ids = data.draw(st.lists(st.integers(0, len(tok) - 1), min_size=1, max_size=40))
    chunks = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    stop = data.draw(st.lists(st.text(min_size=1, max_size=3), max_size=2))
    got, _ = stream_text(tok, ids, chunks, stop)
    assert got == oracle(tok, ids, chunks, stop)


def test_held_back_text_is_sent_as_soon_as_it_is_safe(tokenizers: dict[str, PreTrainedTokenizerBase]) -> None:
    """Streaming, not just the end result: a character split over byte tokens comes out whole
    once complete; a possible stop-string start is held only while it could still match."""
    tok = tokenizers["byte_fallback"]
    s = TextStream(tok)
    ids = tok.encode("a", add_special_tokens=False)
    assert s.add(ids) == "a"
    b = [tok.convert_tokens_to_ids(f"<0x{x:02X}>") for x in "€".encode()]
    assert s.add(b[:1]) == "" and s.add(b[1:2]) == ""
    assert s.add(b[2:]) == ""  # the run of byte tokens may still go on
    assert s.add([tok.convert_tokens_to_ids("a")]) == "€a"
    tok = tokenizers["demo"]
    s = TextStream(tok, stop=["xyz"])
    assert s.add(tok.encode("hello x", add_special_tokens=False)) == "hello"
    assert s.add(tok.encode(" q", add_special_tokens=False)) == " x"
    assert s.flush() == " q"


def test_cost_per_token_does_not_grow_with_the_output(tokenizers: dict[str, PreTrainedTokenizerBase]) -> None:
    """The regression test for the quadratic decode: ids decoded per token stay bounded."""
    tok = tokenizers["demo"]
    ids = tok.encode("The KV cache moves between them, block by block, 中文 é. " * 60, add_special_tokens=False)
    s = TextStream(tok, stop=["never-there"])
    decoded: list[int] = []
    inner = s._decode

    def counting(window: list[int]) -> str:
        decoded.append(len(window))
        return inner(window)

    s._decode = counting  # type: ignore[method-assign]
    text = "".join(s.add([t]) for t in ids) + s.flush()
    assert text == tok.decode(ids, skip_special_tokens=True)
    assert len(ids) > 500 and max(decoded) <= 16, max(decoded)
    assert len(s._view) <= 32  # the text kept for stop-string search stays short too


def test_a_tokenizer_whose_clean_up_is_not_local_is_decoded_whole() -> None:
    """transformers' clean_up_tokenization_spaces (applied to non-BPE models) rewrites " ." as "."
    across token boundaries: such a tokenizer keeps the whole-output decode, and its exact text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = ["[UNK]", "[SEP]", "a", "b", "c", ".", ",", "n't", "do"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]",
                                   clean_up_tokenization_spaces=True)
    assert fast.decode([2, 5]) == "a."  # the clean-up is really applied
    rng = random.Random(1)
    for _ in range(100):
        ids = [rng.randrange(len(words)) for _ in range(rng.randrange(1, 20))]
        got, s = stream_text(fast, ids, [1])
        assert not s.windowed
        assert got == fast.decode(ids, skip_special_tokens=True), ids
