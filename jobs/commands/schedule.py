"""``moe-pretrain schedule add|list|pause|resume|remove|history``: recurring runs.

These commands edit the schedule store; the ``scheduler`` daemon picks the
changes up within ``schedule.poll_seconds``.
"""

from __future__ import annotations

from datetime import datetime, timezone

import typer

from jobs.commands.options import ConfigOpt, SetOpt
from jobs.commands.submit import AddressOpt

app = typer.Typer(
    help="Recurring pipeline runs, submitted as Ray jobs by `moe-pretrain scheduler`."
)


def _store(config, set_):
    from jobs.service.schedule_store import ScheduleStore
    from jobs.settings import load_root_config

    return ScheduleStore(load_root_config(config, set_).schedule.store)


@app.command("add")
def add(
    name: str = typer.Argument(..., help="Schedule name (letters, digits, '_', '-')."),
    cron: str | None = typer.Option(
        None, "--cron", help='"m h dom mon dow" (UTC); 6 fields = with seconds.'
    ),
    every: float | None = typer.Option(None, "--every", min=1, help="Or: every N seconds."),
    address: AddressOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Add a schedule that submits `run` with this config."""
    from jobs.errors import JobError
    from jobs.service.scheduler import check_name, make_trigger
    from jobs.service.submit import resolve_address
    from jobs.settings import load_root_config, raw_tree

    if (cron is None) == (every is None):
        raise JobError("schedule add: pass exactly one of --cron or --every")
    trigger = {"cron": cron} if cron is not None else {"every": every}
    make_trigger(trigger)
    tree = raw_tree(config, set_)
    cfg = load_root_config(config, set_)
    addr = resolve_address(address, cfg.cluster)
    withheld = _store(config, set_).add(check_name(name), trigger, tree, addr)
    typer.echo(f"added {name}")
    if withheld:
        typer.echo(
            f"not stored (credentials): {', '.join(withheld)}; when the schedule fires, the "
            "job gets them from the cluster's environment (AWS_*, MLFLOW_TRACKING_USERNAME/"
            "PASSWORD, ...), and the scheduler's own from its environment"
        )


@app.command("list")
def list_(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Schedules with their trigger, state and next fire time (UTC)."""
    from jobs.commands.tables import echo_table

    store = _store(config, set_)
    nxt = store.next_run_times()
    rows = []
    for s in store.list():
        t = nxt.get(s.name)
        when = datetime.fromtimestamp(t, timezone.utc).isoformat() if t else "-"
        rows.append([s.name, s.describe(), "paused" if s.paused else "active", when, s.address])
    echo_table(["NAME", "TRIGGER", "STATE", "NEXT RUN", "ADDRESS"], rows)


@app.command("pause")
def pause(name: str, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    _store(config, set_).set_paused(name, True)
    typer.echo(f"paused {name}")


@app.command("resume")
def resume(name: str, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    _store(config, set_).set_paused(name, False)
    typer.echo(f"resumed {name}")


@app.command("remove")
def remove(name: str, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    _store(config, set_).remove(name)
    typer.echo(f"removed {name}")


@app.command("history")
def history(
    name: str | None = typer.Argument(None, help="One schedule; default all."),
    limit: int = typer.Option(20, "--limit", min=1),
    refresh: bool = typer.Option(True, "--refresh/--no-refresh", help="Ask Ray and MLflow first."),
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Per run: scheduled time, submission id, status, MLflow run, model version, champion."""
    from jobs.commands.tables import echo_table
    from jobs.service.scheduler import refresh_all

    store = _store(config, set_)
    if refresh:
        refresh_all(store)
    rows = [
        [r.scheduled_time, r.submission_id, r.status, r.mlflow_run_id or "-",
         r.model_version or "-", r.became_champion or "-", r.note]
        for r in store.history(name, limit)
    ]  # fmt: skip
    echo_table(
        ["SCHEDULED", "SUBMISSION", "STATUS", "MLFLOW RUN", "VERSION", "CHAMPION", "NOTE"], rows
    )


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="schedule")
