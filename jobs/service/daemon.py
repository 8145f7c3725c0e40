"""The ``moe-pretrain scheduler`` daemon: APScheduler fed from the schedules table.

APScheduler keeps its jobs in memory (its SQLAlchemy job store would unpickle
them from the file); every ``schedule.poll_seconds`` the daemon brings them in
line with the ``schedules`` table that the CLI edits (added, removed, paused,
resumed), records each job's next fire time in ``fire_times`` (also right after
every fire), and asks Ray how the active runs are doing. A restarted daemon
starts each job at its recorded time, so runs missed while it was down coalesce
into one. ``stop`` (a ``threading.Event``) ends it cleanly;
SIGTERM and Ctrl-C do too.

Nothing else ends it: a fault in one poll is logged and the next poll tries
again; a fault in one fire records that run as ``SUBMIT_FAILED`` with the
reason (``fire_guarded``). Ray and MLflow are imported before any thread
starts: a first ``import ray`` racing in two threads fails with a partial
module (``cannot import name RayActorError``).
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timezone

from jobs.service.config import ScheduleConfig
from jobs.service.schedule_store import ScheduleStore
from jobs.service.scheduler import fire, log, make_trigger, refresh_all, submission_id

FIRE = "jobs.service.daemon:fire_guarded"


def fire_guarded(name: str, store_path: str, scheduled_time: datetime | None = None) -> str:
    """``scheduler.fire``, and any fault it raises recorded as this run's SUBMIT_FAILED."""
    try:
        return fire(name, store_path, scheduled_time)
    except Exception as e:  # the daemon's boundary: one run's fault must not lose the others
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        log.exception("%s: fire failed", name)
        sid, when = submission_id(name, scheduled_time), scheduled_time.isoformat()
        try:
            store = ScheduleStore(store_path)
            if not store.record(name, when, sid, "SUBMIT_FAILED", reason):
                store.update(sid, status="SUBMIT_FAILED", note=reason)
        except Exception:  # the store itself is failing: the log is all that is left
            log.exception("%s: could not record SUBMIT_FAILED", sid)
        return "SUBMIT_FAILED"


def preload() -> None:
    """Import, on the main thread, what polls and fires import lazily."""
    import mlflow  # noqa: F401
    import ray  # noqa: F401
    import ray.exceptions  # noqa: F401
    import ray.job_submission  # noqa: F401

    import jobs.config  # noqa: F401
    import jobs.service.tracking  # noqa: F401


def stamped_executor(max_workers: int = 4):
    """A thread pool that hands ``fire`` the scheduled time it runs for.

    APScheduler 3 calls jobs with their stored arguments only; the scheduled
    time (what the deterministic submission id is made of) reaches executors
    alone, through ``_do_submit_job``: the documented hook for custom executors.
    """
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.job import Job

    class StampedExecutor(ThreadPoolExecutor):
        def _do_submit_job(self, job, run_times):
            stamped = Job.__new__(Job)
            stamped.__setstate__(job.__getstate__())
            stamped._scheduler = job._scheduler
            stamped._jobstore_alias = job._jobstore_alias
            stamped.kwargs = {**job.kwargs, "scheduled_time": run_times[-1]}
            super()._do_submit_job(stamped, run_times[-1:])

    return StampedExecutor(max_workers)


def build_scheduler(store: ScheduleStore):
    from apscheduler.events import EVENT_JOB_SUBMITTED
    from apscheduler.jobstores.memory import MemoryJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    scheduler = BackgroundScheduler(
        jobstores={"default": MemoryJobStore()},
        executors={"default": stamped_executor()},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        timezone=timezone.utc,
    )
    scheduler.add_listener(lambda _: save_fire_times(scheduler, store), EVENT_JOB_SUBMITTED)
    return scheduler


def save_fire_times(scheduler, store: ScheduleStore) -> None:
    store.set_fire_times(
        {
            j.id: j.next_run_time.timestamp() if j.next_run_time is not None else None
            for j in scheduler.get_jobs()
        }
    )


def sync(scheduler, store: ScheduleStore) -> None:
    """Make APScheduler's jobs match the schedules table."""
    wanted = {s.name: s for s in store.list()}
    jobs = {j.id: j for j in scheduler.get_jobs()}
    recorded = store.next_run_times() if not jobs else {}
    for name in jobs.keys() - wanted.keys():
        scheduler.remove_job(name)
        log.info("%s: removed", name)
    for name, sched in wanted.items():
        job = jobs.get(name)
        if job is None:
            at = recorded.get(name)
            when = {"next_run_time": datetime.fromtimestamp(at, timezone.utc)} if at else {}
            job = scheduler.add_job(
                FIRE, make_trigger(sched.trigger), id=name, name=name,
                args=[name, str(store.path)], replace_existing=True, **when,
            )  # fmt: skip
            log.info("%s: added (%s)", name, sched.describe())
        elif str(job.trigger) != str(make_trigger(sched.trigger)):
            job = job.reschedule(make_trigger(sched.trigger))
            log.info("%s: rescheduled (%s)", name, sched.describe())
        if sched.paused and job.next_run_time is not None:
            job.pause()
            log.info("%s: paused", name)
        elif not sched.paused and job.next_run_time is None:
            job.resume()
            log.info("%s: resumed", name)
    save_fire_times(scheduler, store)


def poll(scheduler, store: ScheduleStore) -> bool:
    """One round: sync the jobs, refresh the runs. A fault is logged, never raised."""
    try:
        sync(scheduler, store)
        refresh_all(store)
        scheduler.wakeup()
        return True
    except Exception:  # the daemon's boundary: the next poll tries again
        log.exception("poll failed; retrying in the next one")
        return False


def run_daemon(cfg: ScheduleConfig, stop: threading.Event | None = None) -> None:
    preload()
    store = ScheduleStore(cfg.store)
    stop = stop or threading.Event()
    scheduler = build_scheduler(store)
    scheduler.start(paused=True)
    try:
        try:
            sync(scheduler, store)
        except Exception:
            log.exception("first sync failed; retrying in the next poll")
        scheduler.resume()
        log.info("scheduler up: store %s", store.path)
        while not stop.wait(cfg.poll_seconds):
            poll(scheduler, store)
    finally:
        scheduler.shutdown(wait=True)
        log.info("scheduler down")


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
