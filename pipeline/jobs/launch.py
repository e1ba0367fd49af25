"""`parcae train SPEC`: start the ranks on this machine, or run as one rank under Slurm or torchrun.

A job, not library: it checks the run before anything starts (preflight, once, here) and starts the ranks.
Each rank gets the user's own command line (spec path and ``--set`` overrides) and reads the spec from it,
plus one variable saying preflight is done. That is the one hand-over that works the same everywhere: under
torchrun and Slurm (`parcae slurm-job`) the scheduler starts every rank with the command the user wrote,
and a resolved spec written for the ranks would not exist there; re-reading a spec costs milliseconds.
"""

from __future__ import annotations

import warnings

from parcae_errors import ParcaeError
from pipeline.jobspec import load_spec
from pipeline.training.device import select_accelerator
from pipeline.training.distributed import (
    RankInfo,
    close_distributed,
    dump_stacks_on_request,
    export_rank_env,
    free_port,
    launch_local,
    rank_info,
)
from pipeline.training.preflight import PREFLIGHT_ENV, preflight


def rerun_advice(spec) -> str:
    """What running the same command again does, read from the checkpoint directory now."""
    from pipeline.training.checkpoint import CheckpointError, plan_resume

    assert spec.checkpoint.dir
    try:
        tag = plan_resume(spec.checkpoint.dir, spec.storage.s3_options()).tag
    except (CheckpointError, ParcaeError) as exc:
        return f"before rerunning: {exc}"
    if tag is None:
        return "no checkpoint was written yet: the same command starts the run again from step 0"
    return f"the same command resumes from {tag} ({spec.checkpoint.dir})"


def run_train(spec_path: str, overrides: list[str], resume_from: str | None = None, restart: bool = False) -> int:
    """Train the spec (with ``--set`` overrides) to the end; returns the exit code (75: run me again).
    ``resume_from`` names the checkpoint to resume from instead of the newest; ``restart`` starts at step 0
    with the run's checkpoints moved aside."""
    loaded = load_spec(spec_path, overrides)
    spec = loaded.spec
    info = rank_info()
    if info is None:
        if spec.world_size > 1:
            if spec.cluster.nodes > 1:
                raise ParcaeError(
                    f"cluster.nodes={spec.cluster.nodes}: a multi-node run starts one process per rank under Slurm "
                    "(parcae submit) or torchrun; `parcae train` alone starts ranks on this machine only"
                )
            preflight(spec)  # one clear message before any rank starts
            args = ["train", spec_path, *[f"--set={o}" for o in overrides]]
            args += ["--resume-from", resume_from] if resume_from else []
            args += ["--restart"] if restart else []
            return launch_local(args, spec.world_size, {PREFLIGHT_ENV: "done"}, lambda: rerun_advice(spec))
        info = RankInfo(0, 0, 1, "127.0.0.1", free_port())
    if info.world_size != spec.world_size:
        raise ParcaeError(
            f"cluster: the spec asks for {spec.world_size} ranks (nodes {spec.cluster.nodes} x procs_per_node "
            f"{spec.cluster.procs_per_node}) but {info.world_size} were started"
        )
    export_rank_env(info)
    dump_stacks_on_request()  # the launcher asks a rank that will not leave where it waits
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    select_accelerator(spec.training.device, info.local_rank)  # training.device: cuda without GPUs stops here
    from pipeline.training.trainer import Trainer

    try:
        return Trainer(loaded, info, resume_from, restart).run()
    finally:
        close_distributed()
