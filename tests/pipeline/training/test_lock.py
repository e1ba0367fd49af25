"""The run lock: a local flock that a second owner cannot take, and an S3 lease (against the real S3
endpoint) that is refused while renewed, taken over once stale, and released on exit."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from data_prep.storage import S3Options, open_store
from pipeline.training.lock import LEASE_FILE, RunLock, RunLockedError, _S3Lease


def test_a_second_owner_of_a_run_directory_is_refused_and_a_dead_ones_lock_is_free(tmp_path):
    hold = (
        "import sys, time; from data_prep.storage import S3Options; from pipeline.training.lock import RunLock; "
        f"RunLock({str(tmp_path)!r}, {str(tmp_path / 'checkpoints')!r}, S3Options()).acquire(); "
        "print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLockedError, match=rf"run_dir {tmp_path} is in use by pid {holder.pid} on "):
        RunLock(str(tmp_path), str(tmp_path / "checkpoints"), S3Options()).acquire()
    holder.kill()
    holder.wait()
    RunLock(str(tmp_path), str(tmp_path / "checkpoints"), S3Options()).acquire().release()


def test_s3_lease_is_renewed_refused_taken_over_when_stale_and_released(s3_server):
    bucket = s3_server.new_bucket("lease")
    store = open_store(f"s3://{bucket}/run/checkpoints", S3Options(s3_server.endpoint))
    first = _S3Lease(store, ttl=2.0)
    first.acquire()
    time.sleep(1.2)  # renewed every ttl / 4
    with pytest.raises(RunLockedError, match=r"is in use by pid .* renewed \d+ s ago"):
        _S3Lease(store, ttl=2.0).acquire()
    first._stop.set()  # a stalled owner: no more heartbeats
    first._thread.join()
    time.sleep(2.5)
    second = _S3Lease(store, ttl=2.0)
    second.acquire()  # stale: taken over
    first._stop.clear()
    assert store.put_if(b"x", LEASE_FILE, first.etag) is None  # the stalled owner can no longer renew
    second.release()
    assert not store.exists(LEASE_FILE)
