"""Router text handling: CPU time per streamed token, the old whole-output decode vs the window.

The router turns each streamed token into text (incremental detokenization and stop strings) on its
event loop. Before issue 10, `TextStream.add` decoded the whole output on every token: O(n) per
token, O(n^2) per stream. It now decodes a window of a few ids. Both run here side by side, on the
same token streams, alternating, repeated; the figure is the median CPU time (process time) per
token, and the ratio old/new. The old algorithm is kept in this file only, for this comparison.

Streams: the demo tokenizer's ids of this repository's README (real text), cut to 1k and 8k tokens,
added one token at a time as the router does, with one stop string that never matches (the usual
case: a client that sets `stop` and it does not occur) and without.

    .venv/bin/python bench/router_text_bench.py [--repeats 5] [--lengths 1000 8000]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transformers import PreTrainedTokenizerBase  # noqa: E402

from pdserve.bench.report import header, write_json  # noqa: E402
from pdserve.engine.detokenizer import TextStream  # noqa: E402
from pdserve.model.tokenizer import load_tokenizer  # noqa: E402


class OldTextStream:
    """TextStream as it was before issue 10 (decodes all ids on every add), for comparison only."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.token_ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def add(self, token_ids: list[int]) -> str:
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
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        delta = self.text[self.sent : upto]
        self.sent = max(self.sent, upto)
        return delta


def one_stream(cls: type, tok: PreTrainedTokenizerBase, ids: list[int], stop: list[str]) -> tuple[float, str]:
    """CPU seconds to stream `ids` one token at a time; the text the client got."""
    t0 = time.process_time()
    s = cls(tok, stop)
    parts = [s.add([t]) for t in ids]
    parts.append(s.flush())
    return time.process_time() - t0, "".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000, 8000])
    ap.add_argument("--out", default=str(REPO / "bench/results/router_text.json"))
    args = ap.parse_args()
    tok = load_tokenizer("demo")
    text = (REPO / "README.md").read_text()
    ids = tok.encode(text, add_special_tokens=False)
    while len(ids) < max(args.lengths):
        ids += ids
    rows = []
    for n in args.lengths:
        for stop in ([], ["<never-in-the-text>"]):
            stream = ids[:n]
            raw: dict[str, list[float]] = {"old": [], "new": []}
            for _ in range(args.repeats):
                texts = {}
                for name, cls in (("old", OldTextStream), ("new", TextStream)):
                    cpu, texts[name] = one_stream(cls, tok, stream, stop)
                    raw[name].append(cpu / n)
                assert texts["old"] == texts["new"] == tok.decode(stream, skip_special_tokens=True)
            old, new = statistics.median(raw["old"]), statistics.median(raw["new"])
            rows.append({"output_tokens": n, "stop_strings": len(stop), "old_us_per_token": old * 1e6,
                         "new_us_per_token": new * 1e6, "ratio_old_over_new": old / new,
                         "raw_s_per_token": raw})
            print(f"{n:6d} tokens, {len(stop)} stop: old {old * 1e6:9.1f} us/token   new {new * 1e6:7.1f} us/token"
                  f"   x{old / new:.1f}", flush=True)
    payload = header({"tokenizer": "demo (packaged byte-level BPE)", "text": "README.md, repeated",
                      "repeats": args.repeats, "lengths": args.lengths, "figure": "median CPU s per token"})
    payload["command"] = "python bench/router_text_bench.py " + shlex.join(sys.argv[1:])
    payload["results"] = rows
    write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
