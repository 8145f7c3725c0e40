"""Tokenize cleaned documents; each document's ids end with EOS, the separator in packing.

Runs in an actor pool so the tokenizer is parsed once per actor. Each actor
tokenizes on one thread (the pool supplies the parallelism, and Rayon threads
on top of it would only oversubscribe the cores). Ids leave as one Arrow list
column built from flat numpy buffers, not per-token Python objects.
"""

from __future__ import annotations

import os
from itertools import chain

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.clean import CLEAN_SCHEMA
from pipeline.stage import Stage

TOKENS_SCHEMA = CLEAN_SCHEMA.append(pa.field("ids", pa.list_(pa.uint32())))


class TokenizeStage(Stage):
    name = "tokenize"
    input_columns = tuple(CLEAN_SCHEMA.names)  # the cast to TOKENS_SCHEMA needs them all
    output_columns = ("text", "ids")  # a tokenized document's text is dropped
    compute = "actors"

    def __init__(self, tokenizer_json: str, eos_id: int, batch_size: int = 256):
        self.tokenizer_json = tokenizer_json
        self.eos_id = eos_id
        self.batch_size = batch_size
        self.tokenizer = None

    def setup(self) -> None:
        from tokenizers import Tokenizer

        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.tokenizer = Tokenizer.from_str(self.tokenizer_json)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "tokenizer": None, "_ready": False}

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Flat ids (each document followed by EOS) and per-document lengths including EOS."""
        ids = [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
        body_lens = np.fromiter(map(len, ids), np.int64, count=len(ids))
        body = np.fromiter(chain.from_iterable(ids), np.uint32, count=int(body_lens.sum()))
        lens = body_lens + 1
        ends = np.cumsum(lens)
        flat = np.empty(int(ends[-1]) if len(ends) else 0, np.uint32)
        is_body = np.ones(len(flat), bool)
        is_body[ends - 1] = False
        flat[is_body] = body
        flat[ends - 1] = self.eos_id
        return flat, lens

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.ensure_setup()
        ok = pc.is_null(batch.column("reason"))
        ok_np = ok.to_numpy(zero_copy_only=False)
        texts = batch.column("text").filter(ok).to_pylist()
        flat, lens = self.encode(texts) if texts else (np.empty(0, np.uint32), np.empty(0))
        row_lens = np.zeros(batch.num_rows, np.int32)
        row_lens[ok_np] = lens
        offsets = np.concatenate([[0], np.cumsum(row_lens)]).astype(np.int32)
        ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.uint32()))
        text = pc.if_else(ok, pa.scalar(None, pa.string()), batch.column("text"))
        out = batch.set_column(batch.schema.get_field_index("text"), "text", text)
        schema = _with_extras(batch.schema)
        return out.append_column("ids", ids).select(schema.names).cast(schema)


def _with_extras(schema: pa.Schema) -> pa.Schema:
    """TOKENS_SCHEMA, then the columns that earlier optional stages added (``minhash``)."""
    extra = [f for f in schema if f.name not in TOKENS_SCHEMA.names]
    return pa.schema([*TOKENS_SCHEMA, *extra])
