"""Cleaning: normalisation, each filter and its reason, and the stage on a batch."""

from __future__ import annotations

import unicodedata

import pyarrow as pa

from pipeline.clean import CleanStage, alpha_fraction, check, content_hash, normalize
from pipeline.config import CleanConfig
from pipeline.stage import records_table


def test_normalize_nfc_newlines_and_controls():
    decomposed = unicodedata.normalize("NFD", "café")
    assert (
        normalize(f"  {decomposed}\r\nnext\rline\x07\x1b[0m\tok\x85 ") == "café\nnext\nline[0m\tok"
    )


def test_filters_each_give_their_reason():
    cfg = CleanConfig(min_chars=5, max_chars=100)
    assert check("", cfg)[0] == "empty"
    assert check("abc", cfg)[0] == "too_short"
    assert check("a" * 101, cfg)[0] == "too_long"
    assert check("the same line\n" * 5, cfg)[0] == "repetitive"
    assert check("12 34 56 78 | 90 ||", cfg)[0] == "low_alpha"
    assert check("A plain sentence of prose.\nAnother one.", cfg) is None


def test_quality_filters_can_be_switched_off():
    cfg = CleanConfig(quality_filters=False)
    assert check("the same line\n" * 5, cfg) is None
    assert check("12 34 56", cfg) is None


def test_alpha_fraction_counts_letters_among_non_space():
    assert alpha_fraction("ab 12") == 0.5
    assert alpha_fraction("   ") == 0.0


def test_stage_cleans_hashes_and_passes_rejects_through():
    batch = records_table(
        [
            ("Hello  world, fine text.", "f", 1, 0, None, None),
            (None, "f", 2, 5, "invalid_json", "bad"),
            ("\x01\x02", "f", 3, 9, None, None),
        ]
    )
    out = CleanStage(CleanConfig())(batch)
    assert out.column("reason").to_pylist() == [None, "invalid_json", "empty"]
    assert out.column("hash").to_pylist()[0] == content_hash("Hello  world, fine text.")
    assert out.column("hash").to_pylist()[1:] == [0, 0]
    assert out.column("line").to_pylist() == [1, 2, 3]
    assert out.schema.field("hash").type == pa.int64()
