"""Small corpora and configs shared by the pipeline tests (sizes kept tiny on purpose)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import zstandard

from pipeline.config import PrepareConfig

WORDS = [
    "the",
    "model",
    "reads",
    "tokens",
    "from",
    "packed",
    "rows",
    "while",
    "experts",
    "route",
    "each",
    "token",
    "to",
    "two",
    "of",
    "eight",
    "feed",
    "forward",
    "networks",
    "and",
    "the",
    "router",
    "learns",
    "a",
    "balanced",
    "assignment",
    "over",
    "time",
]


def sentence(rng: random.Random, n: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def document(rng: random.Random, sentences: int = 4) -> str:
    return " ".join(sentence(rng) for _ in range(sentences))


def tiny_config(inputs: list[str], **overrides) -> PrepareConfig:
    base = dict(
        name="tiny",
        inputs=inputs,
        seq_len=31,
        vocab_size=300,
        val_fraction=0.25,
        shard_rows=8,
        batch_size=4,
    )
    base.update(overrides)
    return PrepareConfig(**base)


def write_jsonl(path: Path, records: list, compress: str | None = None) -> Path:
    lines = b"".join(
        (r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records
    )
    if compress == "gzip":
        path.write_bytes(gzip.compress(lines))
    elif compress == "zstd":
        path.write_bytes(zstandard.ZstdCompressor().compress(lines))
    else:
        path.write_bytes(lines)
    return path


@pytest.fixture
def clean_corpus(tmp_path: Path) -> Path:
    """Valid documents only, spread over txt/jsonl(.gz/.zst) files, with one duplicate."""
    rng = random.Random(0)
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    docs = [document(rng) for _ in range(40)]
    for i in range(6):
        (root / f"doc{i:02d}.txt").write_text(docs[i])
    write_jsonl(root / "a.jsonl", [{"text": d} for d in docs[6:20]])
    write_jsonl(root / "sub" / "b.jsonl.gz", [{"text": d} for d in docs[20:30]], "gzip")
    write_jsonl(root / "sub" / "c.jsonl.zst", [{"text": d} for d in docs[30:40] + docs[:1]], "zstd")
    return root


@pytest.fixture
def dirty_corpus(tmp_path: Path) -> Path:
    """Every quarantine reason at least once, with valid records around each bad one."""
    rng = random.Random(1)
    root = tmp_path / "dirty"
    root.mkdir()
    good = lambda: {"text": document(rng)}  # noqa: E731
    write_jsonl(
        root / "mixed.jsonl",
        [
            good(),
            b'{"text": "caf\xe9 au lait"}',
            good(),
            b'{"text": "unterminated',
            good(),
            {"body": "no text field"},
            {"text": 42},
            {"text": "   \x00\x01  "},
            {"text": "tiny"},
            {"text": "x" * 5000},
            {"text": "same line here\n" * 10},
            {"text": "1234 5678 9012 3456 7890 | 1234 5678 9012 ||| 4455"},
            good(),
        ],
    )
    full = write_jsonl(root / "cut.jsonl.gz", [good() for _ in range(30)], "gzip").read_bytes()
    (root / "cut.jsonl.gz").write_bytes(full[: len(full) * 2 // 3])
    zfull = write_jsonl(root / "cut.jsonl.zst", [good() for _ in range(30)], "zstd").read_bytes()
    (root / "cut.jsonl.zst").write_bytes(zfull[: len(zfull) * 2 // 3])
    (root / "blob.txt").write_bytes(b"\x7fELF\x00\x00\x01binary" * 10)
    (root / "dangling.txt").symlink_to(root / "does-not-exist.txt")
    (root / "notes.docx").write_bytes(b"not a format we read")
    (root / "ok.txt").write_text(document(rng))
    return root
