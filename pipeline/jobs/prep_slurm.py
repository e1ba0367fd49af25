"""`parcae prep submit OUT --tasks N`: a plan's units as one Slurm job array, and the merge after it.

Task i of N runs `parcae prep run OUT --task i --tasks N` (the units i, i + N, ... not done yet); the
merge job (`parcae prep merge OUT`) starts when every task has succeeded (``afterok``). Submitting again
after a failure or a preemption reruns only the units without a record: a unit is redone from its start
(the same bytes under the same names), a recorded unit is never touched.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from string import Template

from data_prep.storage import S3Options, make_dir, write_text
from data_prep.units import read_plan
from parcae_errors import ParcaeError
from pipeline.jobs.slurm import SAFE_PATH, check_against_cluster, sbatch
from pipeline.jobspec import ClusterSpec

TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "prep.sbatch.tmpl"


def render(
    command: list[str],
    *,
    job_name: str,
    output: str,
    cpus: int,
    cluster: ClusterSpec,
    setup_lines: list[str],
    array: int | None = None,
) -> str:
    workdir = str(Path.cwd())
    for label, value in (("working directory", workdir), ("--log-dir", output)):
        if not SAFE_PATH.match(value.replace("%A", "").replace("%a", "").replace("%j", "")):
            raise ParcaeError(
                f"{label}: {value!r} has characters a batch script line cannot carry safely "
                "(use letters, digits and . _ / + -)"
            )
    options = {"partition": cluster.partition, "account": cluster.account, "qos": cluster.qos,
               "time": cluster.time_limit}  # fmt: skip
    optional = [f"#SBATCH --{flag}={value}" for flag, value in options.items() if value]
    if array is not None:
        optional.insert(0, f"#SBATCH --array=0-{array - 1}")
    optional.append("#SBATCH --requeue" if cluster.requeue else "#SBATCH --no-requeue")
    return Template(TEMPLATE.read_text()).substitute(
        job_name=job_name,
        cpus=cpus,
        output=output,
        workdir=workdir,
        optional_lines="\n".join(optional),
        setup_lines="\n".join(setup_lines),
        command=" ".join(shlex.quote(part) if part != '"$SLURM_ARRAY_TASK_ID"' else part for part in command),
    )


@dataclass(frozen=True)
class PrepSubmitted:
    """The rendered scripts (array, then merge), the task count, notes; the job ids unless a dry run."""

    scripts: str
    tasks: int
    notes: list[str]
    array_id: str | None = None
    merge_id: str | None = None
    logs: str | None = None


def submit_prep(
    out: str,
    tasks: int,
    *,
    workers: int,
    options: S3Options,
    endpoint_url: str | None,
    region: str | None,
    tokenizer: str | None,
    cluster: ClusterSpec,
    log_dir: str,
    setup_lines: list[str],
    dry_run: bool = False,
) -> PrepSubmitted:
    """Render (and unless ``dry_run`` submit) the prep tasks as one job array and the merge after them; more
    tasks than the plan has units become one task per unit (the result says so)."""
    _, plan = read_plan(out, options)  # the plan must exist; its units decide how many tasks are useful
    units, notes = len(plan["units"]), []
    if tasks > units:
        notes.append(f"--tasks {tasks}: the plan has {units} units; submitting {units} tasks")
        tasks = units
    s3 = [*(["--endpoint-url", endpoint_url] if endpoint_url else []), *(["--region", region] if region else [])]
    run = [sys.executable, "-m", "pipeline", "prep", "run", out, "--task", '"$SLURM_ARRAY_TASK_ID"',
           "--tasks", str(tasks), "--workers", str(workers), *s3]  # fmt: skip
    if tokenizer:
        run += ["--tokenizer", tokenizer]
    merge = [sys.executable, "-m", "pipeline", "prep", "merge", out, *s3]
    logs = str(Path(log_dir).resolve())
    cpus = cluster.cpus_per_task or max(1, workers)
    name = f"prep-{Path(out.rstrip('/')).name}"
    array_script = render(run, job_name=name, output=f"{logs}/%A_%a.out", cpus=cpus, cluster=cluster,
                          setup_lines=setup_lines, array=tasks)  # fmt: skip
    merge_script = render(merge, job_name=f"{name}-merge", output=f"{logs}/merge-%j.out", cpus=1,
                          cluster=cluster, setup_lines=setup_lines)  # fmt: skip
    if dry_run:
        return PrepSubmitted(array_script + merge_script, tasks, notes)
    check_against_cluster(cluster)
    make_dir(Path(logs))
    write_text(Path(logs) / "prep.sbatch", array_script)
    write_text(Path(logs) / "merge.sbatch", merge_script)
    array_id = sbatch(Path(logs) / "prep.sbatch")
    merge_id = sbatch(Path(logs) / "merge.sbatch", f"--dependency=afterok:{array_id}", "--kill-on-invalid-dep=yes")
    with (Path(logs) / "jobs.txt").open("a") as f:
        f.write(f"{array_id} {merge_id}\n")
    return PrepSubmitted(array_script + merge_script, tasks, notes, array_id, merge_id, logs)
