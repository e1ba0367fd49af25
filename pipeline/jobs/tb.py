"""`parcae tb`: TensorBoard over one or more runs' logs, local or on S3, on a chosen port.

Each argument is a run directory (its spec.yaml names the TensorBoard directory), a TensorBoard log
directory, or an s3:// prefix. S3 logs are copied to a local cache through boto3 (the same endpoint
settings as the rest of the pipeline) and re-synced every ``--sync-interval`` seconds, so TensorBoard
needs no S3 support of its own and a live run's new events show up.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from data_prep.storage import S3Options, StorageError, is_s3, open_store
from parcae_errors import ParcaeError, UsageError
from pipeline.jobspec import load_run_spec, load_spec

log = logging.getLogger(__name__)


def _local_logdir(arg: str) -> Path:
    path = Path(arg)
    if not path.exists():
        raise ParcaeError(f"{arg}: no such directory (a run directory, a TensorBoard log directory or an s3:// prefix)")
    if (path / "spec.yaml").is_file():
        tb = load_run_spec(path).logging.tensorboard_dir  # a copied run: its own copy of the logs
        if tb and Path(tb).is_dir():
            return Path(tb)
    return path


def _spec_name(arg: str) -> str | None:
    """A local run directory's spec name (the label its runs get in TensorBoard), else None."""
    spec = Path(arg) / "spec.yaml"
    if is_s3(arg) or not spec.is_file():
        return None
    return load_spec(spec).spec.name


def sync_s3(url: str, cache: Path, options) -> int:
    """Copy new or changed objects under ``url`` into ``cache``; returns how many were copied."""
    store = open_store(url, options)
    copied = 0
    for name in store.list():
        target = cache / name
        size = store.size(name)
        if target.is_file() and target.stat().st_size == size:
            continue  # event files only grow: an unchanged size means nothing new
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        tmp.write_bytes(store.get_bytes(name))
        tmp.replace(target)
        copied += 1
    return copied


def _name(arg: str, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", arg.rstrip("/").split("/")[-1] or "run") or "run"
    name, i = base, 2
    while name in used:
        name, i = f"{base}_{i}", i + 1
    used.add(name)
    return name


def serve(
    logdirs: list[str],
    *,
    port: int,
    host: str,
    endpoint_url: str | None,
    cache: str,
    sync_interval: float,
    say: Callable[[str], None] = lambda _: None,
) -> int:
    """Serve TensorBoard over ``logdirs`` until interrupted; ``say`` gets a line when it serves (its URL and
    runs) and when it stops (the CLI prints them)."""
    if not 0 <= port < 65536:
        raise UsageError(f"--port: 0-65535, got {port}")
    if sync_interval <= 0:
        raise UsageError(f"--sync-interval: seconds > 0, got {sync_interval}")
    quiet = not logging.getLogger().isEnabledFor(logging.DEBUG)  # -v keeps TensorBoard's own INFO lines
    if quiet:
        for name in ("tensorboard", "werkzeug", "absl"):
            logging.getLogger(name).setLevel(logging.WARNING)
    options = S3Options.from_env(endpoint_url)
    cache_root = Path(cache)
    dirs: dict[str, Path] = {}
    remote: dict[str, Path] = {}
    used: set[str] = set()
    for arg in logdirs:
        name = _name(_spec_name(arg) or arg, used)
        if is_s3(arg):
            local = cache_root / re.sub(r"[^A-Za-z0-9_.-]+", "_", arg[len("s3://") :].rstrip("/"))
            copied = sync_s3(arg, local, options)
            if not any(local.rglob("*tfevents*")):
                raise ParcaeError(f"{arg}: no TensorBoard event files (*tfevents*) under this prefix")
            log.info("%s: %d files copied to %s", arg, copied, local)
            dirs[name], remote[arg] = local, local
        else:
            dirs[name] = _local_logdir(arg)
    stop = threading.Event()
    syncer = threading.Thread(target=_keep_synced, args=(remote, options, sync_interval, stop), daemon=True)
    if remote:
        syncer.start()
    from tensorboard import program

    tb = program.TensorBoard()
    links = labelled(dirs, cache_root)
    argv = [None, "--logdir", str(links), "--load_fast", "false", "--host", host]
    argv += ["--port", str(port), "--reload_interval", "5"]
    tb.configure(argv=argv)
    try:
        url = tb.launch()
        if quiet:  # TensorBoard's server resets werkzeug's level when it starts: its request lines need -v
            logging.getLogger("werkzeug").setLevel(logging.WARNING)
    except program.TensorBoardServerException as exc:
        shutil.rmtree(links, ignore_errors=True)
        raise ParcaeError(f"--port {port}: TensorBoard could not start: {exc}") from None
    say(f"TensorBoard at {url} ({', '.join(f'{n} = {p}' for n, p in dirs.items())}); Ctrl-C to stop")
    # Ctrl-C and SIGTERM stop it even when it was started with SIGINT ignored (a background job of a
    # non-interactive shell, and everything that shell starts, inherits an ignored SIGINT: Python then
    # installs no KeyboardInterrupt handler and the server outlived the signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: _exit_now(stop, syncer, links, say))
    try:
        while True:  # short sleeps: a SIGINT delivered to one of TensorBoard's threads wakes no long sleep
            time.sleep(0.5)
    except KeyboardInterrupt:
        _exit_now(stop, syncer, links, say)
    return 0


def labelled(dirs: dict[str, Path], cache_root: Path) -> Path:
    """A directory of links, one per log directory, named by its label: TensorBoard names a run by its path
    under the directory it is given, so a run's own events show as NAME (TensorBoard's ``--logdir_spec
    NAME:PATH`` shows them as ``NAME/.``) and a sweep's points as NAME/POINT."""
    cache_root.mkdir(parents=True, exist_ok=True)
    links = Path(tempfile.mkdtemp(prefix="runs-", dir=cache_root))
    for name, path in dirs.items():
        (links / name).symlink_to(path.resolve(), target_is_directory=True)
    return links


def _exit_now(stop: threading.Event, syncer: threading.Thread, links: Path, say: Callable[[str], None]) -> None:
    """Ctrl-C: stop syncing, then leave at once with 0. TensorBoard's server, its reloader and an S3 sync
    are daemon threads that may be mid-request; the interpreter's own shutdown around them was seen to
    hang, and a foreground server has nothing left to save."""
    from tensorboard import manager

    stop.set()
    if syncer.is_alive():
        syncer.join(timeout=10)
    manager.remove_info_file()
    shutil.rmtree(links, ignore_errors=True)  # the links only: rmtree does not follow them
    say("TensorBoard stopped")
    logging.shutdown()
    sys.stderr.flush()
    os._exit(0)


def _keep_synced(remote: dict[str, Path], options, interval: float, stop: threading.Event) -> None:
    while not stop.wait(interval):
        for url, cache in remote.items():
            try:
                sync_s3(url, cache, options)
            except StorageError as exc:  # a transient outage: keep serving what is cached, try again later
                log.warning("%s: sync failed (%s); serving the cached copy", url, exc)
