"""Locks on the storage root: what two processes must not do at the same time.

Two prepares of the same dataset would delete each other's files; two trainings
of the same run would share its folder. ``storage_lock(uri)`` serialises them:

- local disk: ``fcntl.flock`` on the lock file (released by the kernel when the
  holder dies, so a killed run never leaves a stale lock);
- S3: a conditional create (``If-None-Match: *``) of the lock object. The holder
  rewrites it every ``HEARTBEAT_S``; a lock not rewritten for ``STALE_S`` is
  taken to belong to a dead process and is removed by the next waiter.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator

from pipeline.config import S3Options
from pipeline.storage import filesystem, is_remote

HEARTBEAT_S = 30.0
STALE_S = 300.0
POLL_S = 1.0
log = logging.getLogger("pipeline.locks")


def _owner() -> bytes:
    return json.dumps(
        {"host": socket.gethostname(), "pid": os.getpid(), "at": time.time()}
    ).encode()


@contextlib.contextmanager
def storage_lock(uri: str, s3: S3Options | None = None) -> Iterator[None]:
    """Hold the lock at ``uri`` (a file path or ``s3://`` object) for the ``with`` body."""
    if is_remote(uri):
        with _object_lock(uri, s3):
            yield
        return
    import fcntl

    path = uri.removeprefix("file://")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("waiting for %s: another process holds it", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _object_lock(uri: str, s3: S3Options | None) -> Iterator[None]:
    fs, path = filesystem(uri, s3)
    warned = False
    while True:
        try:
            fs.pipe_file(path, _owner(), mode="create")
            break
        except FileExistsError:
            pass
        if _stale(fs, path):
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(path)
            continue
        if not warned:
            log.warning("waiting for %s: another process holds it", uri)
            warned = True
        time.sleep(POLL_S)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(fs, path, stop), daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)


def _stale(fs, path: str) -> bool:
    fs.invalidate_cache(path)
    try:
        modified = fs.info(path).get("LastModified")
    except FileNotFoundError:
        return False
    if modified is None:
        return False
    return time.time() - modified.timestamp() > STALE_S


def _heartbeat(fs, path: str, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        with contextlib.suppress(OSError):
            fs.pipe_file(path, _owner())
