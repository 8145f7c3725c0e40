"""The tokenizer: train a byte-level BPE on a sample, or load a ``tokenizer.json``.

Byte-level BPE (GPT-2, Radford et al. 2019) never meets an unknown
character, so every cleaned document tokenizes. Special tokens come first in
a trained vocabulary: pad=0, bos=1, eos=2.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.config import PrepareConfig, S3Options, SpecialTokens
from pipeline.errors import PipelineError
from pipeline.storage import filesystem, join
from pipeline.writer import token_dtype


@dataclass(frozen=True)
class TokenizerBundle:
    json: str
    special_ids: dict[str, int]
    vocab_size: int

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.json.encode("utf-8")).hexdigest()

    def load(self) -> Tokenizer:
        return Tokenizer.from_str(self.json)


def train_bpe(texts: Iterable[str], vocab_size: int, special: SpecialTokens) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[special.pad, special.bos, special.eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def read_tokenizer_json(uri: str, s3: S3Options | None) -> str:
    """The text of ``uri`` (a ``tokenizer.json``) or of ``uri/tokenizer.json`` (a folder)."""
    fs, path = filesystem(uri, s3)
    if fs.isdir(path):
        uri = join(uri, "tokenizer.json")
        fs, path = filesystem(uri, s3)
    if not fs.isfile(path):
        raise PipelineError(f"data.tokenizer: no tokenizer.json at {uri!r}")
    text = fs.cat_file(path).decode("utf-8")
    try:
        Tokenizer.from_str(text)
    except Exception as e:
        raise PipelineError(
            f"data.tokenizer: {uri!r} is not a tokenizers JSON file ({e})"
        ) from None
    return text


def tokenizer_identity(cfg: PrepareConfig) -> str:
    """What the fingerprint hashes for the tokenizer: its bytes, or how it will be trained."""
    if cfg.tokenizer:
        text = read_tokenizer_json(cfg.tokenizer, cfg.s3)
        bundle(Tokenizer.from_str(text), cfg)
        return "file:" + hashlib.sha256(text.encode("utf-8")).hexdigest()
    return f"bpe:tokenizers={tokenizers.__version__}"


def bundle(tok: Tokenizer, cfg: PrepareConfig) -> TokenizerBundle:
    """Check the tokenizer against the config and freeze it for the workers."""
    ids = {}
    for role, token in cfg.special_tokens.model_dump().items():
        tid = tok.token_to_id(token)
        if tid is None:
            raise PipelineError(
                f"data.special_tokens.{role}: token {token!r} is not in the tokenizer's vocabulary"
            )
        ids[role] = tid
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > cfg.vocab_size:
        raise PipelineError(
            f"data.vocab_size: the tokenizer has {size} tokens, more than vocab_size {cfg.vocab_size}"
        )
    # Ids, not the entry count, must fit: shards are uint16 up to vocab_size 65535, and a
    # sparse vocabulary (5 entries, one of them id 70000) would wrap silently.
    top = max(tok.get_vocab(with_added_tokens=True).values(), default=0)
    if top >= cfg.vocab_size:
        raise PipelineError(
            f"data.vocab_size: the tokenizer has token id {top}, not below vocab_size "
            f"{cfg.vocab_size} (shards store {token_dtype(cfg.vocab_size).name} ids)"
        )
    return TokenizerBundle(json=tok.to_str(), special_ids=ids, vocab_size=size)
