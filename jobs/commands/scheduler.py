"""``moe-pretrain scheduler``: the daemon that fires the schedules (runs until stopped)."""

from __future__ import annotations

import typer

from jobs.commands.options import ConfigOpt, SetOpt


def scheduler(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Submit each schedule's due runs as Ray jobs; Ctrl-C or SIGTERM stops it cleanly."""
    import signal
    import threading

    from jobs.service.daemon import configure_logging, run_daemon
    from jobs.settings import load_root_config

    cfg = load_root_config(config, set_)
    configure_logging()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    run_daemon(cfg.schedule, stop)


def register(app: typer.Typer) -> None:
    app.command("scheduler")(scheduler)
