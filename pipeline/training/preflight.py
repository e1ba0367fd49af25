"""What must hold before the expensive part starts, checked in one place and reported all at once.

Data: every shard set the spec names (each source of a mixture, each validation set) has a manifest
whose rows fit ``data.seq_len``, whose tokenizer fits the model's vocabulary (and is the spec's
tokenizer file, when the spec names one), and enough shards for the ranks; a mixture's sources share
one tokenizer, and limited sources hold the rows the run needs. Outputs: the run directory, the
TensorBoard directory and the checkpoint directory (local, or an s3:// bucket) can be written.
`parcae train` runs both before the engine is built; `parcae validate` and `parcae submit` run the
data checks whenever the data is reachable.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from data_prep.inspect import read_manifest
from data_prep.storage import LocalStore, StorageError, check_writable, is_s3, open_store
from parcae_errors import ParcaeError, UsageError
from pipeline.data.manifests import check_same_tokenizer
from pipeline.jobspec import JobSpec
from pipeline.training.device import device_problems

log = logging.getLogger(__name__)

# Set for the ranks by the process that started them (our launcher, the Slurm job wrapper) once it has
# run the checks: rank 0 then does not repeat them.
PREFLIGHT_ENV = "PARCAE_PREFLIGHT"


class PreflightError(UsageError):
    """The spec cannot train on this data or into these outputs; ``problems`` has one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        n = sum(not p.startswith("(") for p in problems)  # a note in parentheses is not a problem
        count = f"{n} problem{'s' if n != 1 else ''}"
        super().__init__(f"cannot train ({count}):\n" + "\n".join(f"  {p}" for p in problems))


def data_problems(spec: JobSpec) -> tuple[list[str], list[str]]:
    """(problems, unreadable): what is wrong with the shard sets, and which could not be read at all (from
    a login node the data may live where only the cluster reaches it)."""
    problems: list[str] = []
    unreadable: list[str] = []
    options = spec.storage.s3_options()
    tokenizer_sha = None
    if spec.tokenizer.path:
        parent, _, name = spec.tokenizer.path.rpartition("/")
        try:
            tokenizer_sha = hashlib.sha256(open_store(parent or ".", options).get_bytes(name)).hexdigest()
        except StorageError as exc:  # generate, eval and CORE read it later: refused now, not after the run
            line = (
                f"tokenizer.path: {exc} (the run's generation and evaluation read it; name the tokenizer the "
                "shards were made with, or set tokenizer.path to null to use the one their manifest names)"
            )
            _cannot_read(spec.tokenizer.path, line, problems, unreadable)
    source = spec.checkpoint.init_from
    if source and not source.startswith("s3://") and not Path(source).exists():
        problems.append(f"checkpoint.init_from: {source}: no such weights file or directory")
    sets = data_sets(spec)
    train_manifests: list[tuple[str, str, dict[str, Any]]] = []
    for key, url, is_train in sets:
        try:
            manifest = read_manifest(open_store(url, options))
        except ParcaeError as exc:
            _cannot_read(url, f"{key}: {exc}", problems, unreadable)
            continue
        problems += _manifest_problems(key, url, manifest, spec, tokenizer_sha)
        rows = sum(shard["samples"] for shard in manifest["shards"])
        micro = spec.training.micro_batch_size or 1
        if rows // spec.world_size < micro:
            problems.append(
                f"{key}: {url} holds {rows} rows, fewer than one batch of {micro} (training.micro_batch_size) "
                f"for each of the {spec.world_size} ranks"
            )
        if is_train:
            train_manifests.append((key, url, manifest))
            if len(manifest["shards"]) < spec.world_size:
                problems.append(
                    f"{key}: {url} holds {len(manifest['shards'])} shard(s), fewer than the {spec.world_size} ranks "
                    "(cluster.nodes x procs_per_node) that each read their own; write smaller shards (--shard-size)"
                )
    if len(train_manifests) == len(spec.data.train_sources()):
        problems += mixture_problems(spec, [m for _, _, m in train_manifests])
    downstream_problems(spec, problems, unreadable)
    tokenizer_problems(spec, problems, unreadable)
    return problems, unreadable


PATH_RULE = (
    "(a relative path in a spec or --set starts from the directory the command runs in, here {cwd}; "
    "write ${{SPEC_DIR}}/... for a path relative to the spec file)"
)


def _cannot_read(location: str, line: str, problems: list[str], unreadable: list[str]) -> None:
    """An s3:// location that cannot be read may be out of reach from here only; a local path is a problem
    (with the path rule said once)."""
    if is_s3(location):
        unreadable.append(line)
        return
    problems.append(line)
    rule = PATH_RULE.format(cwd=Path.cwd())
    if rule in problems:
        problems.remove(rule)
    problems.append(rule)


def data_sets(spec: JobSpec) -> list[tuple[str, str, bool]]:
    """(key, url, is a training set) of every shard set the spec names."""
    data = spec.data
    if data.sources is None:
        assert data.train_url is not None
        sets = [("data.train_url", data.train_url, True)]
    else:
        sets = [(f"data.sources[{s.name}].url", s.url, True) for s in data.sources]
        sets += [(f"data.sources[{s.name}].val_url", s.val_url, False) for s in data.sources if s.val_url]
    if data.val_url:
        sets.append(("data.val_url", data.val_url, False))
    return sets


def mixture_problems(spec: JobSpec, manifests: list[dict[str, Any]]) -> list[str]:
    """The sources share one tokenizer, and the limited ones hold the rows the run needs when no
    source repeats. The rows per rank are counted as the loader counts them (the smallest rank's share)."""
    sources = spec.data.train_sources()
    try:
        check_same_tokenizer([(s.name, s.url, m) for s, m in zip(sources, manifests, strict=True)])
    except ParcaeError as exc:
        return [f"data.sources: {exc}"]
    if any(s.max_epochs is None for s in sources):
        return []
    needed = spec.total_steps * (spec.training.global_batch_size or 1)
    held = sum(s.max_epochs * sum(sh["samples"] for sh in m["shards"]) for s, m in zip(sources, manifests, strict=True))
    if held >= needed:
        return []
    limits = ", ".join(f"{s.name} x {s.max_epochs}" for s in sources)
    return [
        f"data.sources: every source has max_epochs ({limits}): together they hold at most {held} rows, and "
        f"{spec.total_steps} steps of {spec.training.global_batch_size} rows need {needed}; raise a max_epochs, "
        "leave one out (that source repeats), or train fewer steps"
    ]


def downstream_problems(spec: JobSpec, problems: list[str], unreadable: list[str]) -> None:
    """eval.downstream: its bundle lists its suites' tasks with their baselines (the items are read by the
    ranks), and the run has a tokenizer to write the prompts with."""
    downstream = spec.eval.downstream
    if not downstream.bundle:
        return
    from pipeline.evaluation.bundle import Bundle, BundleUnreachable

    try:
        bundle = Bundle(downstream.bundle, spec.storage.s3_options())
        for suite in dict.fromkeys(downstream.tasks):
            bundle.suite(suite)
    except BundleUnreachable as exc:
        _cannot_read(downstream.bundle, f"eval.downstream.bundle: {exc}", problems, unreadable)
    except ParcaeError as exc:
        problems.append(f"eval.downstream.bundle: {exc}")


def tokenizer_problems(spec: JobSpec, problems: list[str], unreadable: list[str]) -> None:
    """eval.downstream and logging.sample_prompts write prompts with the run's tokenizer: it must be here."""
    if not (spec.eval.downstream.bundle or spec.logging.sample_prompts):
        return
    location = spec.tokenizer.path
    if not location:
        try:
            location = read_manifest(open_store(spec.data.first_url(), spec.storage.s3_options()))["tokenizer"]["path"]
        except (ParcaeError, KeyError):
            return  # reported with the data
    parent, _, name = str(location).rpartition("/")
    try:
        readable = open_store(parent or ".", spec.storage.s3_options()).exists(name)
    except StorageError as exc:
        _cannot_read(str(location), f"the run's tokenizer {location} (for prompts): {exc}", problems, unreadable)
        return
    if not readable:
        where = "tokenizer.path" if spec.tokenizer.path else "the tokenizer the shards name"
        problems.append(
            f"eval.downstream / logging.sample_prompts: prompts are written with the run's tokenizer, but {where} "
            f"({location}) does not exist here; set tokenizer.path"
        )


def _manifest_problems(
    key: str, url: str, manifest: dict[str, Any], spec: JobSpec, tokenizer_sha: str | None
) -> list[str]:
    problems = []
    if manifest["seq_len"] != spec.data.seq_len:
        problems.append(
            f"{key}: {url} holds rows of seq_len {manifest['seq_len']}, but data.seq_len is {spec.data.seq_len}; "
            "prepare shards with --seq-len matching the spec, or set data.seq_len to the shards'"
        )
    vocab = manifest["tokenizer"].get("vocab_size")
    if isinstance(vocab, int) and vocab > spec.model.vocab_size:
        problems.append(
            f"{key}: {url} was tokenized with a {vocab}-token vocabulary, larger than model.vocab_size "
            f"{spec.model.vocab_size}: token ids would fall outside the embedding; set model.vocab_size >= {vocab} "
            "or prepare the shards with the model's tokenizer"
        )
    kind = manifest["tokenizer"].get("kind", "sentencepiece")
    if spec.tokenizer.kind and spec.tokenizer.kind != kind:
        problems.append(
            f"{key}: {url} was made with a {kind} tokenizer, but tokenizer.kind is {spec.tokenizer.kind}; "
            f"set tokenizer.kind: {kind} (or leave it out)"
        )
    made_with = manifest["tokenizer"].get("sha256")
    if tokenizer_sha and made_with and made_with != tokenizer_sha:
        problems.append(
            f"{key}: {url} was made with another tokenizer (sha256 {made_with[:12]}...) than tokenizer.path "
            f"{spec.tokenizer.path} (sha256 {tokenizer_sha[:12]}...)"
        )
    return problems


def output_problems(spec: JobSpec) -> list[str]:
    """Every output location that cannot be written (each is probed with a small file, then cleaned up)."""
    options = spec.storage.s3_options()
    assert spec.run_dir and spec.logging.tensorboard_dir and spec.checkpoint.dir
    places = [
        ("run_dir", spec.run_dir),
        ("logging.tensorboard_dir", spec.logging.tensorboard_dir),
        ("checkpoint.dir", spec.checkpoint.dir),
    ]
    if spec.checkpoint.staging_dir:
        places.append(("checkpoint.staging_dir", spec.checkpoint.staging_dir))
    problems = []
    for key, url in places:
        try:
            check_writable(open_store(url, options) if url.startswith("s3://") else LocalStore(url))
        except StorageError as exc:
            problems.append(f"{key}: {exc}")
    return problems


def preflight(spec: JobSpec) -> None:
    """Before training: refuse, with every problem at once, what cannot work."""
    problems = device_problems(spec.training.device, spec.cluster.procs_per_node)  # first: the cheapest to fix
    data, unreadable = data_problems(spec)
    problems += data + unreadable + output_problems(spec)
    if problems:
        raise PreflightError(problems)
