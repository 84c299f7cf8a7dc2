"""Tokenizers: a model folder's own (transformers.AutoTokenizer), or the packaged demo one.

`train_tokenizer` builds a small byte-level BPE tokenizer deterministically; it made the packaged
demo tokenizer (scripts/make_demo_tokenizer.py) and makes the tiny test models' tokenizers.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

DEMO_TOKENIZER_DIR = Path(__file__).parent / "assets" / "demo"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer; ids 0, 1, 2 are <pad>, <s>, </s>. Deterministic for the same input."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    """The tokenizer for a model folder, or the packaged one for catalog (dummy-weight) models."""
    path = Path(model)
    if path.is_dir() and (any(path.glob("tokenizer*")) or (path / "vocab.json").exists()):
        return AutoTokenizer.from_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(DEMO_TOKENIZER_DIR))
