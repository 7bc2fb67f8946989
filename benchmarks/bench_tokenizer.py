"""Chunk tokenizer speed: the published per-position Python loop against `I3Tokenizer` on the same Austen text.

    python benchmarks/bench_tokenizer.py                      # paragraphs of the five training books, best of 3
    python benchmarks/bench_tokenizer.py --unit line --repeats 5

The published loop is re-typed from SPEC 4's description of the i3-80M code (lower-case, 3 characters on a trigram or
a space before/after, else 2, prefix fallback, `<UNK>`). I3Tokenizer is called the way `datasets.map(batched=True)`
calls a tokenizer: `tokenizer(batch)` on lists of `--batch_size` texts. Three comparisons:
  compat  - `I3Tokenizer.from_open_i3_vocab` on the vocabulary the published builder makes from this text (the ids
            must be identical, and are checked);
  fixture - the same with the fixtures' published vocabulary (1,701 chunks of Emma: many unknown chunks);
  i3      - the lossless tokenizer shipped at the repo root (its own ids).
"""

import argparse
import glob
import json
import lzma
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoTokenizer  # noqa: E402

from tokenization_i3 import I3Tokenizer  # noqa: E402

FIXTURE_VOCAB = REPO / "tests" / "fixtures" / "open-i3" / "chunk_vocab_combined.json"


class PublishedChunkTokenizer:
    """SPEC 4's chunk tokenizer as the i3-80M code runs it: one Python step per chunk."""

    trigrams = frozenset("the and ing ion tio for tha ter hat his ere ent her was you are not but can all whi one "
                         "our out whe hav thi wit".split())  # fmt: skip

    def __init__(self, chunk_to_idx: dict[str, int]):
        self.chunk_to_idx = chunk_to_idx

    @classmethod
    def build(cls, texts: list[str]) -> "PublishedChunkTokenizer":
        """Every chunk of the lower-cased texts, most frequent first (ties by string), after `<UNK>` = 0."""
        counts: dict[str, int] = {}
        for text in texts:
            text, pos = text.lower(), 0
            while pos < len(text):
                size = cls.chunk_size(text, pos)
                counts[text[pos : pos + size]] = counts.get(text[pos : pos + size], 0) + 1
                pos += size
        ranked = sorted(counts, key=lambda chunk: (-counts[chunk], chunk))
        return cls({"<UNK>": 0, **{chunk: index for index, chunk in enumerate(ranked, start=1)}})

    @classmethod
    def chunk_size(cls, text: str, pos: int) -> int:
        if pos + 3 <= len(text) and (
            text[pos : pos + 3] in cls.trigrams
            or (pos > 0 and text[pos - 1] == " ")
            or (pos + 3 < len(text) and text[pos + 3] == " ")
        ):
            return 3
        return min(2, len(text) - pos)

    def encode(self, text: str) -> list[int]:
        text, pos, ids = text.lower(), 0, []
        while pos < len(text):
            chunk = text[pos : pos + self.chunk_size(text, pos)]
            for size in range(len(chunk), 0, -1):
                if chunk[:size] in self.chunk_to_idx:
                    ids.append(self.chunk_to_idx[chunk[:size]])
                    pos += size
                    break
            else:
                ids.append(0)
                pos += 1
        return ids

    def save(self, path: Path) -> None:
        """The published file layout, so `I3Tokenizer.from_open_i3_vocab` can read it."""
        index = self.chunk_to_idx
        data = {"chunk_to_idx": index, "idx_to_chunk": {i: c for c, i in index.items()}, "vocab_size": len(index),
                "unk_token": "<UNK>", "unk_idx": 0}  # fmt: skip
        path.write_text(json.dumps(data), encoding="utf-8")


def load_texts(unit: str) -> list[str]:
    """The five training books (Persuasion is held out) as documents, paragraphs or lines."""
    paths = [path for path in sorted(glob.glob(str(REPO / "data/austen/*.txt.xz"))) if "persuasion" not in path]
    books = [lzma.open(path, "rt", encoding="utf-8").read() for path in paths]
    if unit == "document":
        return books
    separator = "\n\n" if unit == "paragraph" else "\n"
    return [piece for book in books for piece in book.split(separator) if piece]


def best_time(function, repeats: int) -> tuple[float, list]:
    """Fastest of `repeats` runs (the machine is shared; the minimum is the least disturbed run) and the result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def batched_ids(tokenizer, texts: list[str], batch_size: int) -> list[list[int]]:
    return [ids for i in range(0, len(texts), batch_size) for ids in tokenizer(texts[i : i + batch_size])["input_ids"]]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--unit", choices=["paragraph", "line", "document"], default="paragraph")
    parser.add_argument("--batch_size", type=int, default=1000, help="texts per call (datasets.map's default)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    texts = load_texts(args.unit)
    chars = sum(map(len, texts))
    print(f"{len(texts)} {args.unit}s, {chars:,} characters, batches of {args.batch_size}, best of {args.repeats}")

    published = PublishedChunkTokenizer.build(texts)
    fixture = PublishedChunkTokenizer(json.loads(FIXTURE_VOCAB.read_text())["chunk_to_idx"])
    with tempfile.TemporaryDirectory() as tmp:
        published.save(Path(tmp) / "chunk_vocab_combined.json")
        compat = I3Tokenizer.from_open_i3_vocab(Path(tmp) / "chunk_vocab_combined.json")
    lossless = AutoTokenizer.from_pretrained(str(REPO), trust_remote_code=True)
    runs = {
        "compat": (published, compat),
        "fixture": (fixture, I3Tokenizer.from_open_i3_vocab(FIXTURE_VOCAB)),
        "i3": (published, lossless),
    }
    print(f"{'run':8} {'vocab':>6} {'published loop':>16} {'I3Tokenizer':>16} {'ratio':>6}")
    for name, (loop, tokenizer) in runs.items():
        loop_seconds, loop_ids = best_time(lambda: [loop.encode(text) for text in texts], args.repeats)
        fast_seconds, fast_ids = best_time(lambda: batched_ids(tokenizer, texts, args.batch_size), args.repeats)
        if name != "i3" and fast_ids != loop_ids:
            raise SystemExit(f"{name}: I3Tokenizer ids differ from the published loop's")
        loop_speed, fast_speed = chars / loop_seconds / 1e6, chars / fast_seconds / 1e6
        ratio = fast_speed / loop_speed
        print(f"{name:8} {len(tokenizer):>6} {loop_speed:>10.2f} Mch/s {fast_speed:>10.2f} Mch/s {ratio:>5.1f}x")


if __name__ == "__main__":
    main()
