"""``moe-pretrain prepare``: corpus to packed token shards; the last stdout line is the dataset URI."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from jobs.commands.options import ConfigOpt, SetOpt, flags_as_overrides

InputOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input", "-i", help="File, folder, glob, s3://, hf://datasets/... (repeatable)."
    ),
]
OutputOpt = Annotated[
    str | None, typer.Option("--output", "-o", help="storage.root: a folder or s3://bucket/prefix.")
]
SeqLenOpt = Annotated[
    int | None,
    typer.Option("--seq-len", help="data.seq_len: tokens per training row (rows hold one more)."),
]
VocabOpt = Annotated[
    int | None, typer.Option("--vocab-size", help="data.vocab_size: BPE vocabulary size.")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force", help="Rebuild in full, even if committed or able to extend an earlier build."
    ),
]


def flag_overrides(
    inputs: list[str] | None, output: str | None, seq_len: int | None, vocab_size: int | None
) -> list[str]:
    """The flags as ``--set`` items, applied after the user's own ``--set`` ones."""
    return flags_as_overrides(
        {
            "data.inputs": list(inputs) if inputs else None,
            "storage.root": output,
            "data.seq_len": seq_len,
            "data.vocab_size": vocab_size,
        }
    )


def prepare(
    config: ConfigOpt = None,
    inputs: InputOpt = None,
    output: OutputOpt = None,
    seq_len: SeqLenOpt = None,
    vocab_size: VocabOpt = None,
    overrides: SetOpt = None,
    quiet: QuietOpt = False,
    force: ForceOpt = False,
) -> None:
    """Clean, dedup, tokenize and pack a corpus into a checksummed Parquet dataset."""
    from jobs.settings import load_root_config
    from pipeline.prepare import prepare as run_prepare

    extra = flag_overrides(inputs, output, seq_len, vocab_size)
    cfg = load_root_config(config, [*(overrides or []), *extra])
    result = run_prepare(cfg.data, cfg.storage.root, progress=not quiet, force=force)
    for line in summary_lines(result):
        typer.echo(line)
    typer.echo(result.uri)


def summary_lines(result: Any) -> list[str]:
    m = result.manifest
    q = m["quarantine"]
    reasons = ", ".join(f"{k} {v:,}" for k, v in q["by_reason"].items()) or "none"
    kept = sum(s["documents"] for s in m["splits"].values())
    lines = [
        f"dataset {m['name']} {m['fingerprint']}"
        + (" (cache hit: already prepared)" if result.cache_hit else ""),
        f"  records read {m['records_read']:,}, documents kept {kept:,}, "
        f"duplicates removed {m['duplicates_removed']:,}",
        f"  quarantined {q['total']:,} ({reasons})",
    ]
    inc = m.get("incremental")
    if inc:
        lines.append(
            f"  incremental: extends {inc['base']} with {len(inc['new_sources']):,} new files "
            f"({inc['records_read']:,} records read, "
            f"{inc['duplicates_removed']:,} duplicates removed); its shards are reused"
        )
    for name, split in m["splits"].items():
        lines.append(
            f"  {name}: {split['documents']:,} documents, {split['tokens']:,} tokens in "
            f"{split['rows']:,} rows of {m['row_len']} ({len(split['shards'])} shards), "
            f"remainder {split['remainder_tokens']:,}"
        )
    for src in m.get("mixture") or []:
        epochs = "unbounded" if src["max_epochs"] is None else f"at most {src['max_epochs']:g}"
        lines.append(
            f"  source {src['name']}: weight {src['weight']:g}, epochs {epochs}, "
            f"{src['tokens']:,} tokens, rows train {src['rows']['train']:,} "
            f"val {src['rows']['val']:,}"
        )
    build = m.get("build", {})
    lines.append(
        f"  built in {build.get('seconds', 0):.1f}s, {build.get('tokens_per_s', 0):,} tokens/s"
    )
    return lines


def register(app: typer.Typer) -> None:
    app.command()(prepare)
