"""Rebuild the packaged demo tokenizer (pdserve/model/assets/demo) from the project's own texts.

Usage: python scripts/make_demo_tokenizer.py [TEXT_FILES...]
"""

from __future__ import annotations

import sys
from pathlib import Path

from pdserve.model.tokenizer import DEMO_TOKENIZER_DIR, train_tokenizer


def main() -> None:
    files = sys.argv[1:] or ["../shared/seed-design.md", "../shared/DESIGN.md", "README.md"]
    texts = [line for f in files if Path(f).exists() for line in Path(f).read_text().splitlines()]
    tok = train_tokenizer(texts, vocab_size=4096)
    DEMO_TOKENIZER_DIR.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(DEMO_TOKENIZER_DIR))
    print(f"vocab {len(tok)} -> {DEMO_TOKENIZER_DIR}")


if __name__ == "__main__":
    main()
