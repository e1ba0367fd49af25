"""One run directory, one owner.

A training run holds, for as long as it runs, an exclusive lock on its run directory (``RUN/.parcae-lock``)
and on a local checkpoint directory elsewhere, through ``flock``: the kernel releases it when the process
dies however it dies, so a stale lock from a killed run is simply free. An ``s3://`` checkpoint directory
has a lease object (``.parcae-lease``) written with S3's conditional writes and renewed by a heartbeat;
a lease whose heartbeat is older than its time to live, or whose holder is a dead process on this host,
is taken over. A second owner is refused with a message saying who holds the run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from data_prep.storage import S3Options, S3Store, StorageError, is_s3, open_store
from parcae_errors import ParcaeError

log = logging.getLogger(__name__)

LOCK_FILE = ".parcae-lock"
LEASE_FILE = ".parcae-lease"
LEASE_TTL_S = 60.0


class RunLockedError(ParcaeError):
    """Another process owns the run (exit code 3: nothing was done, try again once it has finished)."""

    exit_code = 3


def _holder() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "command": sys.argv[1:3]}


def _describe(holder: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} (since {since})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _FileLock:
    def __init__(self, directory: Path, what: str):
        self.path, self.what, self.fd = directory / LOCK_FILE, what, -1

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ParcaeError(
                f"{self.what}: {self.path}: cannot create the run's lock: {exc.strerror or exc}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except json.JSONDecodeError:
                holder = {}
            os.close(fd)
            raise RunLockedError(
                f"{self.what} {self.path.parent} is in use by {_describe(holder)} (lock {self.path}); two runs "
                "must not write one run directory: wait for it to finish or stop it, or give this run its own run_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


class _S3Lease:
    def __init__(self, store: S3Store, ttl: float = LEASE_TTL_S):
        self.store, self.ttl = store, ttl
        self.owner, self.etag = uuid.uuid4().hex, None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({**_holder(), "owner": self.owner, "heartbeat": time.time(), "ttl": self.ttl}).encode()

    def acquire(self) -> None:
        current = self.store.get_with_etag(LEASE_FILE)
        etag = None
        if current is not None:
            data, etag = current
            try:
                holder = json.loads(data)
            except json.JSONDecodeError:
                holder = {}
            age = time.time() - float(holder.get("heartbeat", 0))
            dead_here = holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1)))
            if age < float(holder.get("ttl", self.ttl)) and not dead_here:
                raise RunLockedError(
                    f"checkpoint.dir {self.store.url} is in use by {_describe(holder)} (lease "
                    f"{self.store.child_url(LEASE_FILE)}, renewed {age:.0f} s ago); a lease not renewed for "
                    f"{holder.get('ttl', self.ttl):.0f} s is taken over"
                )
            log.warning("taking over the stale lease of %s on %s", _describe(holder), self.store.url)
        self.etag = self.store.put_if(self._record(), LEASE_FILE, etag)
        if self.etag is None:
            raise RunLockedError(f"checkpoint.dir {self.store.url}: another run took the lease at the same moment")
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="parcae-lease")
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                etag = self.store.put_if(self._record(), LEASE_FILE, self.etag)
            except StorageError as exc:  # an outage: try again at the next beat, well within the ttl
                log.warning("lease heartbeat failed (%s); retrying", exc)
                continue
            if etag is None:
                self.lost = True
                log.error("the lease on %s was taken over by another run", self.store.url)
                return
            self.etag = etag

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.etag is not None and not self.lost:
            with contextlib.suppress(StorageError):
                current = self.store.get_with_etag(LEASE_FILE)
                if current is not None and current[1] == self.etag:
                    self.store.delete(LEASE_FILE)
        self.etag = None


class RunLock:
    """Held by rank 0 of a training run from start-up to exit."""

    def __init__(self, run_dir: str, checkpoint_dir: str, options: S3Options):
        self.parts: list[Any] = [_FileLock(Path(run_dir), "run_dir")]
        if is_s3(checkpoint_dir):
            store = open_store(checkpoint_dir, options)
            assert isinstance(store, S3Store)
            self.parts.append(_S3Lease(store))
        elif Path(checkpoint_dir).resolve() != Path(run_dir).resolve() / "checkpoints":
            self.parts.append(_FileLock(Path(checkpoint_dir), "checkpoint.dir"))

    @property
    def lost(self) -> bool:
        return any(getattr(part, "lost", False) for part in self.parts)

    def acquire(self) -> RunLock:
        taken = []
        try:
            for part in self.parts:
                part.acquire()
                taken.append(part)
        except BaseException:
            for part in reversed(taken):
                part.release()
            raise
        return self

    def release(self) -> None:
        for part in reversed(self.parts):
            part.release()
