"""``moe-pretrain demo``: the main job on embedded defaults (what ``make demo`` runs)."""

from __future__ import annotations

import time

import typer

from jobs.commands.options import SetOpt


def demo(set_: SetOpt = None) -> None:
    """Run the whole pipeline on the built-in corpus with local Ray, MLflow and storage."""
    from jobs.service.demo import demo_tree, run_demo
    from jobs.settings import load_root_config

    cfg = load_root_config(None, set_, base=demo_tree())
    start = time.monotonic()
    report = run_demo(cfg)
    (s0, l0), (s1, l1) = report.first_loss, report.last_loss
    cached = [k for k, hit in report.cache_hits.items() if hit]
    echo = typer.echo
    echo("")
    echo(
        f"demo finished in {time.monotonic() - start:.0f}s"
        + (f" (cached: {', '.join(cached)})" if cached else "")
    )
    echo(f"train/loss: step {s0} {l0:.3f} -> step {s1} {l1:.3f} (fell by {l0 - l1:.3f})")
    if report.val_loss is not None:
        echo(f"val/loss:   {report.val_loss:.3f}")
    echo("open the MLflow UI on this store:")
    echo(f"  {report.ui_command}")
    echo(f"model: {report.model_uri}")
    echo(f"sample: {report.sample!r}")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
