"""Shared fixtures. Tests mirror the package tree: tests/model, tests/pipeline, tests/data_prep."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"

# Everything runs on CPU here; keep DeepSpeed off any accelerator probing.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# One intra-op thread per process (set before torch loads, inherited by every run a test starts): the pytest
# workers and the ranks they start already share the cores, and two OpenMP threads per process spin against
# each other (a tiny model's training took 50% more CPU for the same wall time). The demo test runs without it,
# as a user does, and checks the rank's own choice (`cpu_threads_per_rank`).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Inductor's C++ kernels as scalar loops, without SIMD intrinsics (inherited by every process a test starts): the
# compile tests check graph breaks, recompiles, compiled against eager and ZeRO-3 under compile, none of which
# depends on them, and gcc builds scalar kernels for less (test_compile.py cold: 64 CPU-s against 85; the
# compiled parity case: 178 against 196). A GPU's kernels are Triton's, never these.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")
# Bytecode written at a module's first import, as Python does by default, in this process and every process the
# tests start: where PYTHONDONTWRITEBYTECODE is set (as on these machines) each of the suite's 400-odd processes
# compiled every module it imported (0.3 CPU-s a process for the project's own), and `make setup` leaves the
# installed packages' bytecode to their first import (tools/setup.sh).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False


@pytest.fixture
def repo() -> Path:
    return REPO


def parcae_cmd() -> list[str]:
    """The installed entry point, run the way a user runs it (a fresh interpreter)."""
    return [sys.executable, "-m", "pipeline"]


def parcae_in_process(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``parcae ARGS`` inside this test's process: what `python -m pipeline` runs (`pipeline.cli`), with the
    exit code, stdout and stderr as `subprocess.run` gives them. For commands that run in one process (ranks a
    command starts would write to this process's stdout, not to what it returns). It saves the interpreter's
    start-up and imports, 1-3 CPU-s a command. The entry point itself, a fresh interpreter as a user runs it,
    is `parcae_cmd`'s, used by test_errors.py and every training run. ``env``: the whole environment during
    the command (default: this process's). What a command may change process-wide is put back after it:
    ``sys.argv``, logging, the environment, torch's intra-op threads, the handlers of the signals a launcher
    forwards. A command that joins a process group (a rank, which leaves through `os._exit`) cannot run
    here: checked."""
    import contextlib
    import io
    import logging
    import signal

    from pipeline import cli

    out, err = io.StringIO(), io.StringIO()
    names = [*logging.root.manager.loggerDict, *cli.CHATTY_LOGGERS]  # the latter: those _main sets
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in names)]
    levels = {logger: logger.level for logger in loggers}
    handlers = logging.getLogger().handlers[:]
    environ = dict(os.environ)
    signals = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGQUIT)}
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    argv, sys.argv = sys.argv, ["parcae", *args]
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    try:
        with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli._main(list(args))
            except SystemExit as exc:  # argparse's usage errors, --help, --version
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
        logging.getLogger().handlers[:] = handlers
        for logger, level in levels.items():
            logger.setLevel(level)
        os.environ.clear()
        os.environ.update(environ)
        for number, handler in signals.items():
            if handler is not None:  # None: a handler not set from Python, which no command replaces
                signal.signal(number, handler)
        if threads is not None:
            torch.set_num_threads(threads)
    distributed = sys.modules.get("pipeline.training.distributed")
    assert distributed is None or not distributed._INITIALISED, f"parcae {' '.join(args)} started a rank in-process"
    return subprocess.CompletedProcess(["parcae", *args], code, out.getvalue(), err.getvalue())


def parcae_refuses(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``parcae ARGS`` for input it must refuse, in this test's process (`parcae_in_process`): it exits
    non-zero. Each command's work is tested elsewhere."""
    result = parcae_in_process(*args, cwd=cwd)
    assert result.returncode != 0, f"parcae {' '.join(args)} did not refuse: {result.stderr[-2000:]}"
    return result


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, which renders TensorBoard's dashboards in the tests: installed here when missing
    (as root, with apt-get), as slurm/local_cluster.sh installs Slurm."""
    path = shutil.which("chromium")
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]
        with open("/tmp/parcae-apt.lock", "w") as lock:  # one apt at a time (local_cluster.sh takes it too)
            fcntl.flock(lock, fcntl.LOCK_EX)
            if subprocess.run(install, env=env, capture_output=True).returncode != 0:  # stale package lists
                subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=True)
                subprocess.run(install, env=env, capture_output=True, check=True)
        path = shutil.which("chromium")
    assert path, "chromium is not installed (apt-get install chromium): the dashboard tests render TensorBoard with it"
    return path


def free_port() -> int:
    from pipeline.training.distributed import free_port as pick

    return pick()


class S3Server:
    """A real S3 HTTP endpoint (moto's standalone server) on loopback, reached with boto3 like any S3."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self._count = 0

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def new_bucket(self, name: str = "test") -> str:
        self._count += 1
        bucket = f"{name}-{self._count}"
        self.client().create_bucket(Bucket=bucket)
        return bucket


@pytest.fixture(scope="session")
def s3_server():
    """The demo's own local S3 endpoint (`pipeline.jobs.demo.start_local_s3`), once per session."""
    from pipeline.jobs.demo import start_local_s3

    env_before = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    proc, endpoint = start_local_s3()
    try:
        yield S3Server(endpoint)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for key, value in env_before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def once_per_run(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A directory that ``build`` fills once per test run, not once per pytest-xdist worker: the first worker
    to get here builds it beside the workers' own temporary directories, the others wait on its lock and
    read it. For what is deterministic and never written to by a test (tokenizer, shards, reference run)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this run (pytest-xdist's own recipe)
    out = root / f"once-{name}"
    with FileLock(f"{out}.lock"):
        if not (out / ".done").exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            build(out)
            (out / ".done").touch()
    return out


@pytest.fixture(scope="session")
def builtin_docs() -> list[str]:
    from data_prep.corpus import BUILTIN, CorpusSpec, Problems, iter_documents

    return [d.text for d in iter_documents(CorpusSpec((BUILTIN,)), Problems())]


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory, builtin_docs) -> Path:
    """About 2,000 documents of the embedded corpus as JSON Lines (fast to read in every test)."""
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with path.open("w") as f:
        for text in builtin_docs[:2000]:
            f.write(json.dumps({"text": text, "id": len(text)}) + "\n")
    return path


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory, corpus_jsonl) -> Path:
    from data_prep.corpus import CorpusSpec, Problems, iter_documents
    from data_prep.tokenizer import TokenizerSettings, train_tokenizer

    def build(out: Path) -> None:
        docs = iter_documents(CorpusSpec((str(corpus_jsonl),)), Problems())
        train_tokenizer(docs, TokenizerSettings(vocab_size=512, max_sample_chars=300_000), out / "t")

    return once_per_run(tmp_path_factory, "tokenizer", build) / "t.model"


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, corpus_jsonl, tokenizer) -> Path:
    """Train and val shards of 32-token rows (about 40 kB a shard, 5% validation) for the tiny runs."""
    from data_prep.shards import ShardSettings, build_shards

    def build(out: Path) -> None:
        settings = ShardSettings(seq_len=32, shard_bytes=40_000, val_fraction=0.05)
        build_shards([str(corpus_jsonl)], str(tokenizer), str(out), settings, workers=0)

    return once_per_run(tmp_path_factory, "tiny-shards", build)


@pytest.fixture(scope="session")
def tasks_model(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    """The sample eval bundle and a tiny Parcae (`tests.icl_bundles.TASKS_CFG`, seed 0) trained 60 full-batch
    steps on its gold texts (`train_on_tasks`), as (bundle, weights): built once per run for the downstream
    scoring and generation tests. 60 steps keep a margin: at 50 every task's accuracy is already 1.0, at 40
    0.91-0.95 (the scoring test asks > 0.5-0.8); 150 steps, as before, cost 33 CPU-s against 13. The final
    training loss is in ``loss.txt`` beside the weights."""

    def build(out: Path) -> None:
        from model import build_model, save_reference
        from tests.icl_bundles import TASKS_CFG, make_bundle, train_on_tasks

        bundle = make_bundle(out / "eval_bundle")
        model, loss = train_on_tasks(build_model(TASKS_CFG, seed=0), bundle, tokenizer, steps=60)
        save_reference(model, out / "w.safetensors")
        (out / "loss.txt").write_text(f"{loss}\n")

    out = once_per_run(tmp_path_factory, "tasks-model", build)
    return out / "eval_bundle", out / "w.safetensors"


def tiny_run(shards: str | Path, run_dir: str | Path, steps: int, **settings: object) -> list[str]:
    """``--set`` overrides of configs/demo-tiny.yaml for a short run on `tiny_shards` (local or s3://):
    checkpoints every 5 steps, evaluation at 1 and 4 loops every 10, metrics every 5; ``settings``
    (dotted keys with "__" for ".", e.g. ``eval__interval_steps=6``) replace or add overrides."""
    values: dict[str, object] = {
        "data.train_url": f"{shards}/train",
        "data.val_url": f"{shards}/val",
        "data.seq_len": 32,
        "run_dir": run_dir,
        "training.total_steps": steps,
        "checkpoint.interval_steps": 5,
        "eval.interval_steps": 10,
        "eval.loop_counts": "[1, 4]",
        "logging.log_interval": 5,
        "tokenizer.path": "null",  # the shards' own (demo-tiny names the demo's, which tests do not make)
        "logging.peak_flops_per_device": "1e11",  # MFU against a given peak: no matmul timing in every rank
    }
    values.update({key.replace("__", "."): value for key, value in settings.items()})
    return [f"--set={key}={value}" for key, value in values.items()]


def step_losses(run_dir: Path) -> dict[int, float]:
    """Training loss per step from a run's metrics.jsonl (the last occurrence wins: a resumed run rewrites steps)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def train_cmd(shards: Path | str, run_dir: Path, steps: int, *extra: str) -> list[str]:
    """`parcae train` of the tiny spec on `tiny_shards` (or the same shards elsewhere); ``extra``: more overrides."""
    overrides = [*tiny_run(shards, run_dir, steps, data__prefetch_batches=1), *[f"--set={o}" for o in extra]]
    return [*parcae_cmd(), "train", str(CONFIGS / "demo-tiny.yaml"), *overrides]


def start_run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a command in its own process group (so a test can kill the whole run), output in ``log``."""
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", **(env or {})}
    return subprocess.Popen(
        cmd, cwd=REPO, env=full_env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        if (run_dir / "metrics.jsonl").exists() and max(step_losses(run_dir), default=0) >= step:
            return
        time.sleep(0.1)
    raise AssertionError(f"no step {step} within {timeout} s")


REFERENCE_STEPS = 24


@pytest.fixture(scope="session")
def reference_run(tiny_shards, tmp_path_factory) -> Path:
    """The run directory of an uninterrupted 2-rank run of REFERENCE_STEPS steps (`tiny_run`'s settings),
    shared by every worker of the test run: read it, or copy it before writing."""

    def build(out: Path) -> None:
        reference = start_run(train_cmd(tiny_shards, out / "reference", REFERENCE_STEPS), out / "reference.log")
        assert reference.wait(timeout=600) == 0, (out / "reference.log").read_text()[-3000:]

    return once_per_run(tmp_path_factory, "reference", build) / "reference"


@pytest.fixture(scope="session")
def reference_losses(reference_run) -> dict[int, float]:
    """Per-step losses of the reference run: what every interrupted and resumed run must reproduce exactly."""
    result = step_losses(reference_run)
    assert sorted(result) == list(range(1, REFERENCE_STEPS + 1))
    assert result[REFERENCE_STEPS] < result[1] - 0.5  # it learns
    return result


def pytest_configure(config):
    """``--dist loadgroup`` needs a pytest-xdist that can still name a test's group in its id: 3.8.0 cannot
    under pytest 9.2 (pytest-xdist issue 1386, open), and then hands each ``xdist_group`` to several workers
    without a word (the Slurm tests started two local clusters). pyproject.toml keeps pytest below 9.2."""
    from importlib.metadata import version

    def release(name: str) -> tuple[int, ...]:
        return tuple(int(part) for part in version(name).split(".")[:3] if part.isdigit())

    grouping = config.getoption("dist", "no") == "loadgroup"
    if grouping and release("pytest") >= (9, 2) and release("pytest-xdist") <= (3, 8, 0):
        raise pytest.UsageError(
            f"pytest {version('pytest')} with pytest-xdist {version('pytest-xdist')}: --dist loadgroup would "
            "split each xdist_group between workers (pytest-xdist issue 1386); run `make setup`, which "
            "installs the pytest that pyproject.toml's dev extra names (below 9.2)"
        )


def pytest_collection_modifyitems(config, items):
    """The ``heavy`` tests run first, then the modules with slow tests (each module's tests kept together and
    in order): under ``pytest -n`` the workers then finish together instead of one starting a minute-long
    test at the end (the compiled parity case started at minute 11 of 15 and ended the run alone). A stable
    sort: otherwise the collection's order, so test_compile.py runs before the compiled parity case its
    inductor cache serves (their xdist group keeps them in one worker)."""
    slow = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (item.get_closest_marker("heavy") is None, item.nodeid.split("::")[0] not in slow))
