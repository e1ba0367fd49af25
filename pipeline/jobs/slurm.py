"""Slurm: render and submit the batch script (`parcae submit`), watch (`status`), cancel, and the job's
own wrapper (`parcae slurm-job`), which finds the rendezvous, starts one rank per task with srun, passes
the warning signal on, and requeues a preempted job.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from string import Template

from data_prep.storage import make_dir, write_text
from parcae_errors import REQUEUE_EXIT_CODE, ParcaeError
from pipeline.jobs.sweep_record import is_sweep, metrics_records, point_run_dir
from pipeline.jobspec import ClusterSpec, LoadedSpec, load_run_spec, load_spec
from pipeline.jobspec.run_dir import segments
from pipeline.training import checkpoint
from pipeline.training.distributed import die_with_parent, free_port
from pipeline.training.preflight import PREFLIGHT_ENV, PreflightError, data_problems, preflight

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "job.sbatch.tmpl"
SAFE_PATH = re.compile(r"^[A-Za-z0-9_./+-]+$")


class SlurmError(ParcaeError):
    """Slurm refused something or is not reachable; the message carries what it said."""


def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SlurmError(
            f"{cmd[0]}: not found; is this a Slurm login node (or slurm/local_cluster.sh start)?"
        ) from None
    if out.returncode != 0:
        raise SlurmError(f"{' '.join(cmd[:2])}: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def sbatch(script: Path, *options: str) -> str:
    """Submit a batch script; returns the job id."""
    return _run(["sbatch", "--parsable", *options, str(script)]).strip().split(";")[0]


def render(spec: LoadedSpec, run_dir: Path, python: str = sys.executable, output: str | None = None) -> str:
    cluster: ClusterSpec = spec.spec.cluster
    workdir = str(Path.cwd())
    for label, value in (("run_dir", str(run_dir)), ("python", python), ("working directory", workdir)):
        if not SAFE_PATH.match(value):
            raise ParcaeError(
                f"{label}: {value!r} has characters a batch script line cannot carry safely "
                "(use letters, digits and . _ / + -)"
            )
    options = {
        "partition": cluster.partition,
        "account": cluster.account,
        "qos": cluster.qos,
        "time": cluster.time_limit,
        "constraint": cluster.constraint,
        "cpus-per-task": cluster.cpus_per_task,
    }
    optional = [f"#SBATCH --{flag}={value}" for flag, value in options.items() if value]
    if cluster.gpus_per_node:
        gpus = f"{cluster.gpu_type}:{cluster.gpus_per_node}" if cluster.gpu_type else str(cluster.gpus_per_node)
        optional.append(
            f"#SBATCH --gres=gpu:{gpus}" if cluster.gpu_request == "gres" else f"#SBATCH --gpus-per-node={gpus}"
        )
    optional.append("#SBATCH --requeue" if cluster.requeue else "#SBATCH --no-requeue")
    optional += [f"#SBATCH {line}" for line in cluster.extra_sbatch]
    return Template(TEMPLATE.read_text()).substitute(
        job_name=spec.spec.name,
        nodes=f"{cluster.min_nodes}-{cluster.nodes}" if cluster.min_nodes else cluster.nodes,
        tasks_per_node=cluster.procs_per_node,
        output=output or f"{run_dir}/slurm/%j.out",
        workdir=workdir,
        signal_seconds=cluster.signal_seconds,
        optional_lines="\n".join(optional),
        setup_lines="\n".join(cluster.setup_lines),
        python=shlex.quote(python),
        run_dir=shlex.quote(str(run_dir)),
    )


GPU_GRES = re.compile(r"(?:^|,)gpu(?::([A-Za-z][\w.-]*))?:(\d+)")


def gpus_in(gres: str, gpu_type: str | None) -> int:
    """GPUs per node in a node's GRES as sinfo prints it (``gpu:a100:8(S:0-1),mps:400``), of ``gpu_type`` if given."""
    return sum(int(n) for kind, n in GPU_GRES.findall(gres) if gpu_type is None or kind == gpu_type)


def check_against_cluster(cluster: ClusterSpec) -> None:
    """Refuse what the cluster can never run, before submitting: an unknown partition, more nodes than it has,
    more GPUs per node (of the requested type) than its nodes carry."""
    groups: dict[str, list[tuple[int, str, int]]] = {}  # partition -> [(nodes, gres, CPUs per node)]
    default = ""
    for line in _run(["sinfo", "-h", "-o", "%P|%D|%G|%c"]).splitlines():
        name, count, gres, cpus = line.strip().split("|")
        if name.endswith("*"):
            default = name.rstrip("*")
        groups.setdefault(name.rstrip("*"), []).append((int(count), gres, int(cpus.rstrip("+"))))
    partition = cluster.partition or default
    where = f"partition {cluster.partition!r}" if cluster.partition else f"the default partition ({default!r})"
    if partition not in groups:
        known = ", ".join(sorted(groups))
        raise ParcaeError(
            f"cluster.partition: {cluster.partition!r} does not exist on this cluster (partitions: {known})"
        )
    total = sum(nodes for nodes, _, _ in groups[partition])
    if cluster.nodes > total:
        raise ParcaeError(f"cluster.nodes: {cluster.nodes} requested, but {where} has {total} node(s)")
    cpus, most = (cluster.cpus_per_task or 1) * cluster.procs_per_node, max(c for _, _, c in groups[partition])
    if cpus > most:
        raise ParcaeError(
            f"cluster.cpus_per_task: {cluster.cpus_per_task} x procs_per_node {cluster.procs_per_node} = {cpus} CPUs "
            f"per node requested, but the nodes of {where} have at most {most}"
        )
    if not cluster.gpus_per_node:
        return
    need = cluster.gpus_per_node
    wanted = f"{need} {cluster.gpu_type + ' ' if cluster.gpu_type else ''}GPU(s) per node"
    fitting = sum(n for n, gres, _ in groups[partition] if gpus_in(gres, cluster.gpu_type) >= need)
    if fitting < cluster.nodes:
        offered = ", ".join(sorted({f"{nodes} node(s) with GRES {gres}" for nodes, gres, _ in groups[partition]}))
        field = "cluster.gpu_type" if cluster.gpu_type and not fitting else "cluster.gpus_per_node"
        raise ParcaeError(
            f"{field}: {cluster.nodes} node(s) with {wanted} requested, but {where} has {fitting} such node(s) "
            f"({offered}); choose a GPU partition (cluster.partition), fewer GPUs per node or another gpu_type"
        )


@dataclass(frozen=True)
class Submitted:
    """What `submit` did: the rendered batch script, and (unless a dry run) the job and where it logs."""

    script: str
    job_id: str | None = None
    path: Path | None = None
    log: Path | None = None


def submit(spec_path: str, overrides: list[str], dry_run: bool) -> Submitted:
    loaded = load_spec(spec_path, overrides)
    run_dir = Path(loaded.spec.run_dir or f"runs/{loaded.spec.name}").resolve()
    script = render(loaded, run_dir)
    if dry_run:
        return Submitted(script)
    check_against_cluster(loaded.spec.cluster)
    problems, _ = data_problems(loaded.spec)  # data the login node cannot read is checked by the job
    if problems:
        raise PreflightError(problems)
    make_dir(run_dir / "slurm")
    loaded.spec.run_dir = str(run_dir)
    loaded.save(run_dir / "spec.yaml")
    path = run_dir / "slurm" / "job.sbatch"
    write_text(path, script)
    job_id = sbatch(path)
    with (run_dir / "slurm" / "jobs.txt").open("a") as f:
        f.write(job_id + "\n")
    return Submitted(script, job_id, path, run_dir / "slurm" / f"{job_id}.out")


def _job_id(run: str) -> str:
    jobs = Path(run) / "slurm" / "jobs.txt"
    if not jobs.is_file():
        raise ParcaeError(f"{run}: no Slurm job was submitted from this run directory ({jobs} missing)")
    return jobs.read_text().split()[-1]


def _scontrol_show(kind: str, name: str) -> dict[str, str]:
    """`scontrol show job|node NAME`'s fields (a job's JobState, NodeList, RunTime, ...; a node's NodeAddr)."""
    text = _run(["scontrol", "show", kind, name, "--oneliner"])
    return dict(item.split("=", 1) for item in text.split() if "=" in item)


def status(run: str) -> list[str]:
    """A submitted run's Slurm state, its segments (where it started, on how many ranks), its last logged
    step and loss and its newest checkpoint, one line each."""
    job = _job_id(run)
    fields = {}
    try:
        fields = _scontrol_show("job", job)
    except SlurmError as exc:
        fields = {"JobState": f"unknown ({exc})"}
    lines = [
        f"job {job}: {fields.get('JobState', '?')}, nodes {fields.get('NodeList', '?')}, "
        f"elapsed {fields.get('RunTime', '?')}, restarts {fields.get('Restarts', '0')}"
    ]
    for number, segment in enumerate(segments(Path(run)), 1):
        job_of = f", job {segment['job']} (restart {segment.get('restart', 0)})" if "job" in segment else ""
        lines.append(
            f"segment {number}: from step {segment['step']} on {segment['world_size']} rank(s), "
            f"{segment['nodes']} node(s){job_of}, started {segment['started']}"
        )
    last = [r for r in metrics_records(Path(run)) if "loss" in r]
    if last:
        lines.append(f"last logged step {last[-1]['step']}, loss {last[-1]['loss']:.4f}")
    lines.append(f"checkpoint: {_newest_checkpoint(Path(run))}")
    return lines


def _newest_checkpoint(run: Path) -> str:
    directory = str(run / "checkpoints")
    options = None
    if (run / "spec.yaml").is_file():
        spec = load_run_spec(run)
        directory = spec.checkpoint.dir or directory
        options = spec.storage.s3_options()
    try:
        tag = checkpoint.latest_tag(directory, options)
    except ParcaeError as exc:
        return f"unknown ({exc})"
    return f"{tag} (in {directory})" if tag else "none yet"


def cancel(run: str) -> str:
    """Cancel a run's newest job; its id."""
    job = _job_id(run)
    _run(["scancel", job])
    return job


def _rendezvous_port(addr: str, job: str) -> int:
    """A port free now on the first node, where this wrapper and rank 0 run. (A port derived from the job id
    collided when two jobs' ids agreed modulo 20000 on one node: rank 0 could not listen, EADDRINUSE.)"""
    try:
        return free_port(addr)
    except OSError:  # the address is not this machine's: the id-derived port, as a manual srun gets it
        return 20000 + int(job) % 20000


def _cancelled(job: str) -> bool:
    """Whether Slurm has cancelled the job (scancel), as its controller says now."""
    try:
        return _scontrol_show("job", job).get("JobState", "").startswith("CANCELLED")
    except SlurmError:  # the controller unreachable: decide as before, without its word
        return False


def allocation_overrides(cluster: ClusterSpec, env: dict[str, str] | os._Environ[str]) -> list[str]:
    """``--set`` overrides for an allocation of another node count than the spec names (a ``--nodes=min-max``
    range, or a job requeued or resubmitted with other ``--nodes``): the ranks are what Slurm gave, the global
    batch is kept and the accumulation follows (refused by the spec's own check when it cannot)."""
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or cluster.nodes)
    if nodes == cluster.nodes:
        return []
    log.warning(
        "the job has %d node(s), the spec names %d: training on %d x %d rank(s), the global batch kept",
        nodes, cluster.nodes, nodes, cluster.procs_per_node,
    )  # fmt: skip
    return [f"cluster.nodes={nodes}", "training.gradient_accumulation_steps=null"]


def slurm_job(run_dir: str) -> int:
    """Inside the batch script: rendezvous, one rank per task via srun, the warning signal, requeue."""
    env = os.environ
    job = env.get("SLURM_JOB_ID") or ""
    if not job:
        raise ParcaeError("slurm-job runs inside a Slurm batch job (no SLURM_JOB_ID)")
    first = _run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]]).split()[0]
    addr = _scontrol_show("node", first).get("NodeAddr", first)
    port = _rendezvous_port(addr, job)
    rank_env = {**env, "MASTER_ADDR": addr, "MASTER_PORT": str(port)}
    if addr.startswith("127."):
        rank_env["GLOO_SOCKET_IFNAME"] = "lo"
    if is_sweep(Path(run_dir)):  # a sweep's job array: this task's point
        run_dir = str(point_run_dir(Path(run_dir), int(env.get("SLURM_ARRAY_TASK_ID", "-1"))))
    spec = Path(run_dir) / "spec.yaml"
    loaded = load_spec(spec)
    resized = allocation_overrides(loaded.spec.cluster, env)
    if resized:  # another node count: the spec as the ranks will read it (accumulation derived again)
        loaded = load_spec(spec, resized)
    preflight(loaded.spec)  # once, here, before any rank starts: one clear message in the job log
    rank_env[PREFLIGHT_ENV] = "done"
    ranks = loaded.spec.cluster  # the allocation's nodes: srun's task count follows them, not the submission's
    layout = [f"--nodes={ranks.nodes}", f"--ntasks={ranks.world_size}", f"--ntasks-per-node={ranks.procs_per_node}"]
    cmd = ["srun", "--kill-on-bad-exit=1", *layout, sys.executable, "-m", "pipeline", "train", str(spec)]
    cmd += [f"--set={override}" for override in resized]
    proc = subprocess.Popen(cmd, env=rank_env, preexec_fn=die_with_parent)

    forwarded: list[int] = []

    def forward(signum, _frame):
        forwarded.append(signum)
        log.warning("signal %d: asking the ranks to checkpoint and stop", signum)
        subprocess.run(
            ["scancel", f"--signal={signal.Signals(signum).name.removeprefix('SIG')}", f"{job}.0"], capture_output=True
        )

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, forward)
    code = proc.wait()
    # USR1 is the warning before the time limit or a preemption: the ranks checkpoint and the wrapper
    # requeues. SIGTERM is a cancel (or Slurm's own preemption, which requeues by itself): the ranks
    # checkpoint, nothing is requeued from here. srun may report 143 when it stops the other tasks after
    # the first one exits 75, so a warned step that exited non-zero counts as preempted.
    warned = signal.SIGUSR1 in forwarded
    terminated = signal.SIGTERM in forwarded
    preempted = code == REQUEUE_EXIT_CODE or (warned and code != 0)
    restarts = int(env.get("SLURM_RESTART_COUNT", "0"))
    cluster = loaded.spec.cluster
    retry_failure = code != 0 and not forwarded and restarts < cluster.max_requeues
    if cluster.requeue and not terminated and (preempted or retry_failure):
        if _cancelled(job):
            # scancel while srun started or ran: the job step went first ("Slurm job N has expired"), and the
            # SIGTERM that says "cancel" had not reached this wrapper yet; a requeue would undo the cancel
            log.warning("job %s was cancelled (exit %d): not requeued", job, code)
            return code
        why = "preempted" if preempted else f"failed with {code} (retry {restarts + 1} of {cluster.max_requeues})"
        log.warning("job %s %s: requeueing; it resumes from %s/checkpoints", job, why, run_dir)
        _run(["scontrol", "requeue", job])
        return 0
    if code != 0 and not forwarded:
        log.error(
            "job %s failed with %d after %d requeue(s); not requeued again (cluster.max_requeues)", job, code, restarts
        )
    return REQUEUE_EXIT_CODE if preempted else code
