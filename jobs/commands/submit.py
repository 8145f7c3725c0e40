"""``moe-pretrain submit``: run the pipeline as a Ray job; last stdout line = submission id."""

from __future__ import annotations

from typing import Annotated

import typer

from jobs.commands.options import ConfigOpt, SetOpt

AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address", "-a", help="Ray dashboard URL (http://HEAD:8265); default cluster.address."
    ),
]


def submit(
    address: AddressOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    submission_id: str | None = typer.Option(
        None, "--submission-id", help="Default: Ray picks one."
    ),
    follow: bool = typer.Option(False, "--follow", help="Stream the job's logs until it ends."),
) -> None:
    """Submit `moe-pretrain run` with this config to a Ray cluster."""
    from jobs.service import submit as sub
    from jobs.settings import load_root_config, raw_tree

    tree = raw_tree(config, set_)
    cfg = load_root_config(config, set_)
    addr = sub.resolve_address(address, cfg.cluster)
    sid, withheld = sub.submit_run(tree, cfg.cluster, addr, submission_id=submission_id)
    for line in sub.withheld_lines(withheld):
        typer.echo(f"warning: {line}", err=True)
    typer.echo(
        f"submitted to {addr}; follow with: moe-pretrain logs {sid} --follow -a {addr}", err=True
    )
    if follow:
        sub.follow_logs(addr, sid, write=lambda s: typer.echo(s, nl=False, err=True))
        typer.echo(f"status: {sub.job_info(addr, sid).status}", err=True)
    typer.echo(sid)


def register(app: typer.Typer) -> None:
    app.command("submit")(submit)
