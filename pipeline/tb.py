"""`parcae tb`: TensorBoard over one or more runs' logs, local or on S3, on a chosen port.

Each argument is a run directory (its spec.yaml names the TensorBoard directory), a TensorBoard log
directory, or an s3:// prefix. S3 logs are copied to a local cache through boto3 (the same endpoint
settings as the rest of the pipeline) and re-synced every ``--sync-interval`` seconds, so TensorBoard
needs no S3 support of its own and a live run's new events show up.
"""

from __future__ import annotations

import argparse
import logging
import re
import threading
import time
from pathlib import Path

from pipeline.errors import ParcaeError

log = logging.getLogger(__name__)


def _local_logdir(arg: str) -> Path:
    path = Path(arg)
    if not path.exists():
        raise ParcaeError(f"{arg}: no such directory (a run directory, a TensorBoard log directory or an s3:// prefix)")
    if (path / "spec.yaml").is_file():
        from pipeline.spec_io import load_spec

        tb = load_spec(path / "spec.yaml").spec.logging.tensorboard_dir
        if tb and Path(tb).is_dir():
            return Path(tb)
    return path


def sync_s3(url: str, cache: Path, options) -> int:
    """Copy new or changed objects under ``url`` into ``cache``; returns how many were copied."""
    from data_prep.storage import open_store

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


def run_tb(args: argparse.Namespace) -> int:
    from data_prep.storage import S3Options, StorageError

    if not 0 <= args.port < 65536:
        raise ParcaeError(f"--port: 0-65535, got {args.port}")
    if args.sync_interval <= 0:
        raise ParcaeError(f"--sync-interval: seconds > 0, got {args.sync_interval}")
    options = S3Options.from_env(args.endpoint_url)
    cache_root = Path(args.cache)
    dirs: dict[str, Path] = {}
    remote: dict[str, Path] = {}
    used: set[str] = set()
    for arg in args.logdirs:
        name = _name(arg, used)
        if arg.startswith("s3://"):
            cache = cache_root / re.sub(r"[^A-Za-z0-9_.-]+", "_", arg[len("s3://") :].rstrip("/"))
            try:
                copied = sync_s3(arg, cache, options)
            except StorageError as exc:
                raise ParcaeError(str(exc)) from None
            if not any(cache.rglob("*tfevents*")):
                raise ParcaeError(f"{arg}: no TensorBoard event files (*tfevents*) under this prefix")
            log.info("%s: %d files copied to %s", arg, copied, cache)
            dirs[name], remote[arg] = cache, cache
        else:
            dirs[name] = _local_logdir(arg)
    if remote:
        threading.Thread(target=_keep_synced, args=(remote, options, args.sync_interval), daemon=True).start()
    from tensorboard import program

    tb = program.TensorBoard()
    spec = ",".join(f"{name}:{path}" for name, path in dirs.items())
    argv = [None, "--logdir_spec", spec, "--host", args.host, "--port", str(args.port), "--reload_interval", "5"]
    tb.configure(argv=argv)
    try:
        url = tb.launch()
    except program.TensorBoardServerException as exc:
        raise ParcaeError(f"--port {args.port}: TensorBoard could not start: {exc}") from None
    print(f"TensorBoard at {url} ({', '.join(f'{n} = {p}' for n, p in dirs.items())}); Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


def _keep_synced(remote: dict[str, Path], options, interval: float) -> None:
    from data_prep.storage import StorageError

    while True:
        time.sleep(interval)
        for url, cache in remote.items():
            try:
                sync_s3(url, cache, options)
            except StorageError as exc:  # a transient outage: keep serving what is cached, try again later
                log.warning("%s: sync failed (%s); serving the cached copy", url, exc)
