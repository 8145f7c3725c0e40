"""``moe-pretrain status|logs|stop ID``: follow a submitted Ray job."""

from __future__ import annotations

import json

import typer

from jobs.commands.options import ConfigOpt, SetOpt
from jobs.commands.submit import AddressOpt


def _address(address, config, set_) -> str:
    from jobs.service.submit import resolve_address
    from jobs.settings import load_root_config

    return resolve_address(address, load_root_config(config, set_).cluster)


def status(
    submission_id: str = typer.Argument(..., help="What `submit` printed."),
    address: AddressOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: bool = typer.Option(False, "--json", help="All fields as JSON."),
) -> None:
    """Print the job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    from dataclasses import asdict

    from jobs.service.submit import job_info

    info = job_info(_address(address, config, set_), submission_id)
    if as_json:
        typer.echo(json.dumps(asdict(info), sort_keys=True))
        return
    if info.message:
        typer.echo(info.message, err=True)
    typer.echo(info.status)


def logs(
    submission_id: str = typer.Argument(..., help="What `submit` printed."),
    address: AddressOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the job ends."),
) -> None:
    """Print the job's driver logs."""
    from jobs.service.submit import follow_logs, job_logs

    addr = _address(address, config, set_)
    if follow:
        follow_logs(addr, submission_id, write=lambda s: typer.echo(s, nl=False))
    else:
        typer.echo(job_logs(addr, submission_id), nl=False)


def stop(
    submission_id: str = typer.Argument(..., help="What `submit` printed."),
    address: AddressOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Ask the cluster to stop the job."""
    from jobs.service.submit import stop_job

    stopped = stop_job(_address(address, config, set_), submission_id)
    typer.echo("stopping" if stopped else "not running")


def register(app: typer.Typer) -> None:
    app.command("status")(status)
    app.command("logs")(logs)
    app.command("stop")(stop)
