"""Typed config of the ``prepare`` stage (section ``data`` of the config tree).

Everything that changes the bytes of the output is part of the dataset
fingerprint; ``RUNTIME_ONLY`` lists the keys that only change how fast it runs
(parallelism, batch sizes), how storage is reached (credentials) or whether
an earlier dataset may be extended (an extension's fingerprint hashes its
base's instead), which are left out of it so that a rerun on a bigger machine is still a cache hit.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.config_base import NAME_PATTERN, Section
from pipeline.naming import default_name
from pipeline.redaction import redact

RUNTIME_ONLY = ("num_workers", "batch_size", "s3", "incremental")


class CleanConfig(Section):
    """Normalisation is always on (NFC, control characters out); the filters can be tuned."""

    min_chars: int = Field(1, ge=1, description="Shorter documents are quarantined (too_short).")
    max_chars: int = Field(
        1_000_000, ge=1, description="Longer documents are quarantined (too_long)."
    )
    quality_filters: bool = Field(True, description="Repetition and alphabetic-ratio heuristics.")
    max_repeated_line_fraction: float = Field(
        0.3, gt=0, le=1, description="Gopher (Rae et al. 2021): chars in duplicated lines."
    )
    min_alpha_fraction: float = Field(
        0.25, ge=0, le=1, description="Letters / non-space characters; catches tables and dumps."
    )

    @field_validator("max_chars")
    @classmethod
    def _bounds(cls, v: int, info: ValidationInfo) -> int:
        low = info.data.get("min_chars", 1)
        if v < low:
            raise ValueError(f"must be >= min_chars ({low})")
        return v


class NearDupConfig(Section):
    """MinHash LSH near-duplicate removal (Broder 1997); off unless ``threshold`` is set."""

    threshold: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Estimated Jaccard similarity of word n-gram sets at or above which the "
        "later document is quarantined (near_duplicate); None = off. 0.8 is the usual choice "
        "(Lee et al. 2022, 'Deduplicating Training Data Makes Language Models Better').",
    )
    ngram: int = Field(5, ge=1, description="Words per shingle (Lee et al. 2022 use 5).")
    num_perm: int = Field(
        128, ge=16, le=1024, description="MinHash permutations: more = sharper threshold, slower."
    )

    @property
    def enabled(self) -> bool:
        return self.threshold is not None


class SpecialTokens(Section):
    pad: str = "<pad>"
    bos: str = "<bos>"
    eos: str = "<eos>"


class S3Options(Section):
    """Overrides of the standard AWS variables (``AWS_ENDPOINT_URL`` etc.); never logged."""

    endpoint_url: str | None = None
    region: str | None = None
    key: SecretStr | None = None
    secret: SecretStr | None = None
    anon: bool = False


class _NamedInputs(Section):
    """The rules a dataset and a mixture source share for their ``name`` and ``inputs``."""

    @field_validator("name", check_fields=False)
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_PATTERN.match(v):
            raise ValueError("must be letters, digits, '.', '_' or '-'")
        return v

    @field_validator("inputs", check_fields=False)
    @classmethod
    def _inputs(cls, v: list[str]) -> list[str]:
        if not v or any(not s.strip() for s in v):
            raise ValueError("must be a non-empty list of URIs")
        return v


class SourceConfig(_NamedInputs):
    """One named part of a mixture: its own shards, drawn from by ``weight`` in training."""

    name: str = Field(description="Folder under train/ and val/; `val/<name>/loss` in MLflow.")
    inputs: list[str] = Field(description="Files, folders, globs, URIs, as data.inputs.")
    weight: float = Field(1.0, gt=0, description="Relative share of training samples.")
    max_epochs: float | None = Field(
        None,
        gt=0,
        description="Passes over this source's train rows at most; then its weight is "
        "renormalised away. None = repeated as often as its weight asks.",
    )


class PrepareConfig(_NamedInputs):
    name: str = Field(
        "python-docs",
        description="Dataset name: a folder under datasets/; default: read off the inputs "
        "(alice.txt -> alice, several -> first-and-N-more).",
    )
    inputs: list[str] = Field(
        default_factory=lambda: ["builtin://python-docs"],
        description="Files, folders, globs, s3://, hf://datasets/..., builtin://python-docs.",
    )
    sources: list[SourceConfig] | None = Field(
        None,
        description="A weighted mixture of named sources, each with its own inputs; "
        "None = data.inputs is the one source.",
    )
    seq_len: int = Field(256, gt=0)
    vocab_size: int = Field(8192, ge=256)
    val_fraction: float = Field(0.02, ge=0.0, lt=1.0)

    text_field: str = Field("text", description="JSON key / Parquet column holding the text.")
    txt_split: Literal["file", "paragraph"] = Field(
        "file", description="A .txt file is one document, or one per blank-line paragraph."
    )
    clean: CleanConfig = CleanConfig()
    max_file_bytes: int = Field(
        4 << 30,
        gt=0,
        description="Decompressed bytes read from one file (a zip bomb's bound): past it the "
        "rest of the file is quarantined (too_large); the records before it are kept.",
    )
    dedup: bool = Field(True, description="Drop exact duplicates (after cleaning) corpus-wide.")
    near_dup: NearDupConfig = NearDupConfig()
    max_documents: int | None = Field(
        None, gt=0, description="Keep the first N documents (stable order) after dedup."
    )

    tokenizer: str | None = Field(
        None, description="tokenizer.json or a folder holding one; None = train byte-level BPE."
    )
    tokenizer_sample_chars: int = Field(
        10_000_000, gt=0, description="Characters (stable order) the BPE is trained on."
    )
    special_tokens: SpecialTokens = SpecialTokens()
    incremental: bool = Field(
        True,
        description="When only new files appeared since a committed dataset of this name "
        "and config, tokenize just those and reuse its shards and tokenizer.",
    )

    shard_rows: int = Field(8192, gt=0, description="Packed rows per Parquet shard.")
    num_workers: int | None = Field(
        None, gt=0, description="Tokenizer actors; None = one per CPU of the Ray cluster."
    )
    batch_size: int = Field(256, gt=0, description="Documents per tokenizer call.")
    s3: S3Options = S3Options()

    @model_validator(mode="before")
    @classmethod
    def _derived_inputs_and_name(cls, data: Any) -> Any:
        """A mixture's ``inputs`` are its sources' (so a dumped config validates again);
        ``name`` defaults to one read off the inputs."""
        if not isinstance(data, dict):
            return data
        sources = data.get("sources")
        if isinstance(sources, list):
            listed = [u for s in sources if isinstance(s, dict) for u in s.get("inputs") or []]
            given = data.get("inputs")
            if given is not None and list(given) != listed:
                raise ValueError(
                    "config key 'data.inputs': give data.inputs or data.sources, not both"
                )
            if listed:
                data = {**data, "inputs": listed}
        if data.get("name") is None and data.get("inputs"):
            return {**data, "name": default_name(list(data["inputs"]))}
        return data

    @model_validator(mode="after")
    def _sources_named_once(self) -> PrepareConfig:
        if self.sources is None:
            return self
        names = [s.name for s in self.sources]
        if not names:
            raise ValueError("config key 'data.sources': must list at least one source")
        if len(set(names)) != len(names):
            raise ValueError(f"config key 'data.sources': source names repeat ({names})")
        return self

    @property
    def mixture(self) -> list[SourceConfig]:
        """The sources; a config without ``sources`` is one source named after the dataset."""
        if self.sources is not None:
            return list(self.sources)
        return [SourceConfig(name=self.name, inputs=self.inputs)]

    @property
    def row_len(self) -> int:
        return self.seq_len + 1

    def fingerprint_view(self) -> dict[str, Any]:
        """The keys that decide the output bytes (see ``RUNTIME_ONLY``)."""
        view = self.model_dump(mode="json", exclude=set(RUNTIME_ONLY))
        # Unset, these change no byte: datasets built before the keys existed stay cache hits.
        if not self.near_dup.enabled:
            del view["near_dup"]
        if self.sources is None:
            del view["sources"]
        return view

    def public_view(self) -> dict[str, Any]:
        """The resolved config as written to the manifest: credentials redacted, by key
        (``SecretStr`` fields) and by value (``data.s3.endpoint_url``, input URIs)."""
        return redact(self.model_dump(mode="json"))
