"""``moe-pretrain train``: Ray Train pretraining; the last stdout line is the final checkpoint URI."""

from __future__ import annotations

import contextlib
import sys
from typing import Annotated

import typer

from jobs.commands.options import ConfigOpt, SetOpt, flags_as_overrides

DatasetOpt = Annotated[
    str, typer.Option("--dataset", "-d", help="Dataset folder (local or s3://), from prepare.")
]
PresetOpt = Annotated[str | None, typer.Option("--preset", help="model.preset")]
StepsOpt = Annotated[int | None, typer.Option("--max-steps", help="train.max_steps")]
WorkersOpt = Annotated[int | None, typer.Option("--num-workers", help="train.num_workers")]
RunNameOpt = Annotated[
    str | None,
    typer.Option("--run-name", help="Names the Ray Train run, its checkpoints and the MLflow run."),
]
StorageOpt = Annotated[str | None, typer.Option("--storage", help="storage.root")]
CkptOpt = Annotated[int | None, typer.Option("--checkpoint-every", help="train.checkpoint_every")]
FailuresOpt = Annotated[int | None, typer.Option("--max-failures", help="train.max_failures")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="train.seed")]
TrackingOpt = Annotated[str | None, typer.Option("--tracking-uri", help="tracking.uri")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


def train(
    dataset: DatasetOpt,
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    max_steps: StepsOpt = None,
    num_workers: WorkersOpt = None,
    run_name: RunNameOpt = None,
    storage: StorageOpt = None,
    checkpoint_every: CkptOpt = None,
    max_failures: FailuresOpt = None,
    seed: SeedOpt = None,
    tracking_uri: TrackingOpt = None,
    overrides: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Pretrain the MoE model on a prepared dataset with Ray Train (resumes a named run)."""
    from jobs.settings import load_root_config
    from jobs.train.driver import train as run_train

    extra = flags_as_overrides(
        {
            "model.preset": preset,
            "train.max_steps": max_steps,
            "train.num_workers": num_workers,
            "storage.root": storage,
            "train.checkpoint_every": checkpoint_every,
            "train.max_failures": max_failures,
            "train.seed": seed,
            "tracking.uri": tracking_uri,
        }
    )
    cfg = load_root_config(config, [*(overrides or []), *extra])
    import ray

    owns_ray = not ray.is_initialized()
    # Ray forwards the workers' prints to the driver's stdout: keep them on stderr,
    # and flush them all (shutdown) before printing, so that the URI stays last.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            result = run_train(cfg, dataset, run_name=run_name, progress=not quiet)
        finally:
            if owns_ray:
                ray.shutdown()
    m = result.metrics
    typer.echo(f"run {result.run_name}: {result.steps} steps, mlflow run {result.mlflow_run_id}")
    if "val/loss" in m:
        typer.echo(f"  val/loss {m['val/loss']:.4f}  val/perplexity {m['val/perplexity']:.2f}")
    typer.echo(result.checkpoint_uri)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
