"""Tokenizer: deterministic BPE training, special ids, loading from a file or folder."""

from __future__ import annotations

import pytest

from pipeline.config import SpecialTokens
from pipeline.errors import PipelineError
from pipeline.tokenizer import bundle, read_tokenizer_json, tokenizer_identity, train_bpe
from tests.pipeline.conftest import tiny_config

TEXTS = ["the quick brown fox jumps over the lazy dog " * 3, "dogs and foxes, quickly!"] * 20


def test_training_is_deterministic_and_special_tokens_come_first():
    a = train_bpe(iter(TEXTS), 300, SpecialTokens())
    b = train_bpe(iter(TEXTS), 300, SpecialTokens())
    assert a.to_str() == b.to_str()
    cfg = tiny_config(["x"])
    tok = bundle(a, cfg)
    assert tok.special_ids == {"pad": 0, "bos": 1, "eos": 2}
    assert tok.vocab_size <= 300
    text = "the lazy fox"
    assert a.decode(a.encode(text, add_special_tokens=False).ids) == text


def test_loading_from_file_or_folder_and_identity(tmp_path):
    tok = train_bpe(iter(TEXTS), 300, SpecialTokens())
    tok.save(str(tmp_path / "tokenizer.json"))
    assert read_tokenizer_json(str(tmp_path), None) == read_tokenizer_json(
        str(tmp_path / "tokenizer.json"), None
    )
    ident = tokenizer_identity(tiny_config(["x"], tokenizer=str(tmp_path)))
    assert ident.startswith("file:") and len(ident) == 5 + 64
    assert tokenizer_identity(tiny_config(["x"])).startswith("bpe:")


def test_bad_tokenizer_inputs_fail_with_one_line(tmp_path):
    with pytest.raises(PipelineError, match="no tokenizer.json"):
        read_tokenizer_json(str(tmp_path), None)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(PipelineError, match="not a tokenizers JSON"):
        read_tokenizer_json(str(tmp_path), None)
    tok = train_bpe(iter(TEXTS), 300, SpecialTokens())
    with pytest.raises(PipelineError, match="vocab_size: the tokenizer has"):
        bundle(tok, tiny_config(["x"], vocab_size=256))
    with pytest.raises(PipelineError, match="special_tokens.eos: token '</s>'"):
        bundle(tok, tiny_config(["x"], special_tokens={"eos": "</s>"}))
