"""Job specs: small plain-data Pydantic models under one `JobSpec`.

Each component receives its own sub-spec, never the whole job. Every model forbids unknown keys;
rules that span fields raise `RuleViolations`, which name each offending field so that the loader
(`pipeline.jobspec.load`) can report every problem with its dotted path at once.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Annotated, Any, ClassVar, Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)

from data_prep.storage import S3Options
from model.config import MAX_LOOPS, ParcaeConfig

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# Slurm --time: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S, or UNLIMITED/INFINITE
SLURM_TIME_PATTERN = r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d{1,2}|\d+-\d{1,2}:\d{1,2}|\d+-\d{1,2}:\d{1,2}:\d{1,2}|UNLIMITED|INFINITE)$"  # noqa: E501
# Upper bounds: what the code can represent and what makes sense; every numeric field has one.
Count = Annotated[int, Field(gt=0, le=10**9)]  # steps, intervals: a billion is beyond any run
Size = Annotated[int, Field(gt=0, le=2**40)]  # bytes and element counts
Fraction = Annotated[float, Field(ge=0, lt=1)]
SafeLine = Annotated[str, Field(pattern=r"^[^\n\r\x00]*$")]


class Problem(NamedTuple):
    """One broken rule: the field it is reported on, its value, the message, and every field it reads
    (dotted paths relative to the spec model that checks it; ``deps`` defaults to ``(path,)``)."""

    path: str
    value: Any
    message: str
    deps: tuple[str, ...] = ()


class RuleViolations(ValueError):
    """Cross-field rule failures raised from a model validator; the loader expands them to dotted paths."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("; ".join(f"{p.path}: {p.message}" for p in problems))


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    # Keys that were renamed: the old key is refused with a message naming the new one.
    RENAMED: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            problems = [
                Problem(old, data[old], f"renamed: write {new} instead", (old,))
                for old, new in cls.RENAMED.items()
                if old in data
            ]
            if problems:
                raise RuleViolations(problems)
        return data

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_other_types(cls, value: Any, info: Any) -> Any:
        """A boolean where a number or text is expected is refused, not read as 1 or 0: YAML reads yes, no,
        on, off, true and false as booleans, and pydantic would turn them into numbers."""
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if field is None:
            return value
        items = value if isinstance(value, list) else [value]
        if any(isinstance(v, bool) for v in items) and not _takes_bool(field.annotation, isinstance(value, list)):
            raise ValueError(
                f"expected {_type_name(field.annotation)}, got a boolean (YAML reads yes, no, on, off, true and "
                "false as booleans; quote text)"
            )
        return value


def _takes_bool(annotation: Any, inside_list: bool = False) -> bool:
    """Whether a field of this type takes a boolean (its items' type, for a list given)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is bool or annotation is Any:
        return True
    if origin is Literal:
        return any(isinstance(a, bool) for a in args)
    if origin is Annotated:
        return _takes_bool(args[0], inside_list)
    if origin in (list, tuple, set) and inside_list:
        return any(_takes_bool(a) for a in args) if args else True
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        return any(_takes_bool(a, inside_list) for a in args)
    return False


def _type_name(annotation: Any) -> str:
    """What a field takes, in words: "an integer", "a number (or null)", "a list of numbers"."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        named = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" (or null)" if type(None) in args else "")
    if origin in (list, tuple, set):
        inner = {_type_name(a) for a in args if a is not Ellipsis}
        return "a list of " + " or ".join(sorted(i.removeprefix("an ").removeprefix("a ") + "s" for i in inner))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    return {int: "an integer", float: "a number", str: "text"}.get(annotation, getattr(annotation, "__name__", "?"))


def _model_fields() -> dict[str, Any]:
    """ModelSpec's fields, from `ParcaeConfig`'s: type, default, bounds and description declared once."""
    hints = typing.get_type_hints(ParcaeConfig)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(ParcaeConfig):
        meta = dict(f.metadata)
        description = meta.pop("doc", "") or None
        fields[f.name] = (Annotated[hints[f.name], Field(description=description, **meta)], f.default)
    return fields


_ModelFields = create_model("_ModelFields", __base__=Spec, **_model_fields())


class ModelSpec(_ModelFields):  # type: ignore[misc, valid-type]
    """Architecture, sizes, injection and loop settings (defaults: parcae-140m). The fields are
    `model.config.ParcaeConfig`'s; the rules across them are its `problems()`."""

    _LOOPED_ONLY: ClassVar[frozenset[str]] = frozenset(
        {"n_prelude", "n_core", "n_coda", "injection", "mean_recurrence", "mean_backprop_depth"}
    )

    @model_validator(mode="after")
    def _rules(self) -> ModelSpec:
        problems = [Problem(p.field, getattr(self, p.field), p.message, p.reads) for p in self.build().problems()]
        if self.arch == "gpt":
            for key in sorted(self._LOOPED_ONLY & self.model_fields_set):
                message = "only applies to arch=parcae; the GPT baseline takes n_layers"
                problems.append(Problem(key, getattr(self, key), message, (key, "arch")))
        elif "n_layers" in self.model_fields_set:
            message = "only applies to arch=gpt; Parcae takes n_prelude / n_core / n_coda"
            problems.append(Problem("n_layers", self.n_layers, message, ("n_layers", "arch")))
        if problems:
            raise RuleViolations(problems)
        return self

    @model_serializer(mode="wrap")
    def _only_applicable(self, handler: Any) -> dict[str, Any]:
        """Saved specs hold only the keys that apply to the architecture, so they load back."""
        data = handler(self)
        drop = {"n_layers"} if self.arch == "parcae" else self._LOOPED_ONLY
        return {k: v for k, v in data.items() if k not in drop}

    def build(self) -> ParcaeConfig:
        return ParcaeConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ParcaeConfig)})


class TokenizerSpec(Spec):
    """The tokenizer the shards were made with (their manifests record its kind, specials and sha256)."""

    kind: Literal["sentencepiece", "huggingface"] | None = Field(
        None, description="sentencepiece (a .model) or huggingface (a tokenizer.json); checked against the shards."
    )
    path: str | None = Field(
        None, description="Local path or s3:// URL of the .model or tokenizer.json; checked against the shards."
    )


class SourceSpec(Spec):
    """One shard set of a mixture: its share of the training rows, and what happens when it runs out."""

    name: Annotated[str, Field(pattern=NAME_PATTERN, description="The source's name in logs and metrics.")]
    url: str = Field(description="Local directory or s3:// prefix holding manifest.json and shards.")
    weight: float = Field(description="Relative share of the training rows (> 0); weights need not sum to 1.")
    max_epochs: Annotated[int, Field(gt=0, le=10**6)] | None = Field(
        None,
        description="Passes over the source before it stops and the other sources take its share (default: it "
        "repeats for as long as the run needs).",
    )
    val_url: str | None = Field(None, description="This source's validation shard set (val/<name>/ metrics).")

    @field_validator("weight")
    @classmethod
    def _positive_weight(cls, value: float, info: Any) -> float:
        if not 0 < value <= 1e6:
            name = info.data.get("name", "?")
            raise ValueError(
                f"source {name!r}: weight {value} is not a share of rows; give a number > 0 (relative to the other "
                "sources' weights), or remove the source"
            )
        return value


class DataSpec(Spec):
    """Where the shards are and how they are streamed: one shard set (``train_url``) or a mixture of
    several (``sources``), each global batch drawing rows from them in proportion to their weights."""

    train_url: str | None = Field(
        None, description="Local directory or s3:// prefix holding manifest.json and shards (one source)."
    )
    sources: list[SourceSpec] | None = Field(
        None, description="A mixture: [{name, url, weight, max_epochs?, val_url?}, ...] instead of train_url."
    )
    val_url: str | None = Field(
        None, description="Validation shard set (same layout), optional; the headline loss/val is measured on it."
    )
    on_mixture_change: Literal["refuse", "apply"] = Field(
        "refuse",
        description="Resuming with other sources or weights than the checkpoint's: refuse (say what changed), or "
        "apply the new mixture from the resumed step on (each kept source continues where it was).",
    )
    seq_len: Annotated[int, Field(gt=0, le=2**20)] = Field(2048, description="Tokens per training sequence.")
    shuffle_buffer: Annotated[int, Field(ge=0, le=10**7)] = Field(
        1000, description="Samples held in memory for shuffling (per source)."
    )
    prefetch_batches: Annotated[int, Field(ge=0, le=64)] = Field(
        1,
        description="Read-ahead depth in batches of each rank's one reader thread (0: read inside the training "
        "step). One reader per rank streams its share of the shards; pre-tokenised rows need kilobytes per second.",
    )
    on_bad_shard: Literal["error", "skip"] = "error"
    max_bad_shard_share: Annotated[float, Field(ge=0, le=1)] = Field(
        0.05,
        description="With on_bad_shard: skip, the share of a shard set's shards that may be skipped (one always "
        "may) before the run stops naming them; a rank whose shards all fail stops in any case.",
    )

    RENAMED: ClassVar[dict[str, str]] = {"num_workers": "data.prefetch_batches (the read-ahead depth in batches)"}

    @model_validator(mode="after")
    def _one_kind_of_source(self) -> DataSpec:
        if self.train_url is None and self.sources is None:
            message = "required: data.train_url (one shard set) or data.sources (a mixture)"
            raise RuleViolations([Problem("train_url", None, message, ("train_url", "sources"))])
        if self.train_url is not None and self.sources is not None:
            message = "set data.train_url (one shard set) or data.sources (a mixture), not both"
            raise RuleViolations([Problem("train_url", self.train_url, message, ("train_url", "sources"))])
        if self.sources is not None:
            names = [s.name for s in self.sources]
            repeated = sorted({n for n in names if names.count(n) > 1})
            if not names:
                raise RuleViolations([Problem("sources", [], "a mixture needs at least one source", ("sources",))])
            if repeated:
                message = f"source names must differ; {', '.join(map(repr, repeated))} repeats"
                raise RuleViolations([Problem("sources", names, message, ("sources",))])
        return self

    def train_sources(self) -> list[SourceSpec]:
        """The mixture (``train_url`` is a one-source mixture named "train")."""
        if self.sources is not None:
            return list(self.sources)
        assert self.train_url is not None
        return [SourceSpec(name="train", url=self.train_url, weight=1.0)]

    def first_url(self) -> str:
        """The shard set whose manifest stands for the run's data (its tokenizer, for prompts)."""
        return self.train_sources()[0].url


class OptimizerSpec(Spec):
    """AdamW, or Muon for the blocks' matrices with an auxiliary AdamW. ``muon`` is the Parcae reference's
    variant (Polar Express, per-neuron normalisation, cautious decaying weight decay); ``muon-deepspeed``
    is DeepSpeed's plain Muon (Newton-Schulz, plain weight decay, clipping on the orthogonalised update)."""

    name: Literal["adamw", "muon", "muon-deepspeed"] = "adamw"
    lr: Annotated[float, Field(gt=0, le=1e4)] = Field(
        8e-3, description="Learning rate (Muon's for the matrices when name=muon)."
    )
    adam_lr: Annotated[float, Field(gt=0, le=1e4)] | None = Field(
        None, description="Auxiliary AdamW lr with Muon (default: lr)."
    )
    betas: tuple[Fraction, Fraction] = (0.8, 0.95)
    eps: Annotated[float, Field(gt=0, le=1)] = 1e-10
    weight_decay: Annotated[float, Field(ge=0, le=100)] = 0.0
    muon_weight_decay: Annotated[float, Field(ge=0, le=100)] = 0.2
    muon_momentum: Fraction = 0.95
    muon_momentum_warmup_start: Fraction = 0.85
    muon_momentum_warmup_steps: Annotated[int, Field(ge=0, le=10**9)] = 300
    muon_beta2: Fraction = Field(0.95, description="muon: EMA rate of the per-neuron second moment.")
    grad_clip: Annotated[float, Field(ge=0, le=1e6)] = Field(1.0, description="Global gradient norm clip; 0 = off.")


class ScheduleSpec(Spec):
    """Learning-rate shape: warmup, then constant / cosine / linear decay, or trapezoid."""

    kind: Literal["constant", "cosine", "linear", "trapezoid"] = "trapezoid"
    warmup_steps: Annotated[int, Field(ge=0, le=10**9)] = 0
    decay_fraction: Annotated[float, Field(gt=0, le=1)] = Field(
        0.5, description="trapezoid: fraction of the steps spent decaying linearly to min_lr_ratio."
    )
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.0


class TrainingSpec(Spec):
    """Batch sizes in sequences; the run length in steps or tokens."""

    micro_batch_size: Annotated[int, Field(gt=0, le=2**16)] | None = Field(
        None, description="Sequences per rank per micro-step."
    )
    global_batch_size: Annotated[int, Field(gt=0, le=2**24)] | None = Field(
        None, description="Sequences per optimizer step."
    )
    gradient_accumulation_steps: Annotated[int, Field(gt=0, le=2**16)] | None = None
    total_steps: Count | None = None
    total_tokens: Annotated[int, Field(gt=0, le=10**16)] | None = None
    on_world_size_change: Literal["convert", "refuse"] = Field(
        "convert",
        description="A checkpoint resumed on another world size (same global batch): convert rewrites its ZeRO-3 "
        "state for the new ranks (once, kept beside it) and continues exactly; refuse stops, as torchtitan does.",
    )
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 1337
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto",
        description="cuda: the run needs GPUs and refuses to start without them (the shipped GPU configs); cpu: "
        "train on CPUs even where GPUs are visible; auto: what DeepSpeed's accelerator reports.",
    )
    collective_timeout_s: Annotated[int, Field(ge=10, le=86400)] = Field(
        1800,
        description="A collective (all-gather, reduce-scatter, all-reduce) not complete after this long ends the run "
        "with a message naming it: a hung or dead rank stops the job instead of holding the allocation.",
    )
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16"] = Field(
        "auto",
        description="bf16-mixed: the reference's (fp32 weights under autocast: bf16 matmuls, fp32 residual stream "
        "and loop state); bf16: everything bf16 (fp32 master weights); auto: bf16-mixed on GPU, fp32 on CPU.",
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="torch.compile the repeated units (blocks outside the loop, the loop body); auto: on GPU, off on "
        "CPU (a first compile there takes about a minute).",
    )
    max_nonfinite_steps: Annotated[int, Field(gt=0, le=10**6)] = Field(
        5, description="Stop (with a checkpoint) after this many non-finite micro-batch losses in a row."
    )
    spike_zscore: Annotated[float, Field(gt=0, le=1e3)] | None = Field(
        None, description="Skip micro-batches whose loss exceeds the recent mean by this many standard deviations."
    )

    @field_validator("compile", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        """YAML reads a bare on/off (and yes/no, true/false) as a boolean."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _length(self) -> TrainingSpec:
        if (self.total_steps is None) == (self.total_tokens is None):
            value = {"total_steps": self.total_steps, "total_tokens": self.total_tokens}
            message = "set exactly one of training.total_steps / training.total_tokens"
            raise RuleViolations([Problem("total_steps", value, message, ("total_steps", "total_tokens"))])
        return self


def is_base_config_path(name: str) -> bool:
    """zero.base_config names a JSON file (a slash or a .json suffix), not a shipped base config."""
    return "/" in name or name.endswith(".json")


class ZeroSpec(Spec):
    """ZeRO stage, offload and bucket sizes; ``base_config`` names a file in ds_configs/ or a path."""

    stage: Literal[0, 1, 2, 3] = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    base_config: str = Field("zero3", description="ds_configs/<name>.json or a path to a JSON file.")
    reduce_bucket_size: Size | None = None
    prefetch_bucket_size: Size | None = None
    param_persistence_threshold: Annotated[int, Field(ge=0, le=2**40)] | None = None
    gather_unit: Literal["block", "module"] = Field(
        "block",
        description="Stage 3: what ZeRO gathers as one unit. block: each prelude/coda block, and the whole "
        "recurrence (injection + core blocks, gathered once per forward for every loop); module: every "
        "nn.Module on its own (DeepSpeed's default: hooks on each call, a trace that changes with the loop count).",
    )

    @model_validator(mode="after")
    def _offload(self) -> ZeroSpec:
        if self.offload_params and self.stage != 3:
            message = f"needs zero.stage 3 (stage is {self.stage})"
            raise RuleViolations([Problem("offload_params", True, message, ("offload_params", "stage"))])
        if self.offload_optimizer and self.stage == 0:
            message = "needs zero.stage 1, 2 or 3"
            raise RuleViolations([Problem("offload_optimizer", True, message, ("offload_optimizer", "stage"))])
        return self


class CheckpointSpec(Spec):
    dir: str | None = Field(None, description="Local path or s3:// URL (default: <run_dir>/checkpoints).")
    staging_dir: str | None = Field(
        None,
        description="With an s3:// dir: where DeepSpeed writes a checkpoint before it is uploaded, and where a "
        "resume downloads it (node-local or shared; default <run_dir>/checkpoint-staging).",
    )
    interval_steps: Count = 1000
    keep_last: Annotated[int, Field(gt=0, le=10**6)] = 3
    init_from: str | None = Field(
        None,
        description="Weights to start from at step 0 (a released model directory, our or reference-named "
        "safetensors, an exported file; local or s3://): model weights only, a fresh optimizer; refused when they "
        "are not this spec's model. Once the run has checkpoints of its own, resuming takes precedence.",
    )


class LoggingSpec(Spec):
    tensorboard_dir: str | None = Field(None, description="Default: <run_dir>/tensorboard.")
    log_interval: Count = 10
    all_ranks: bool = Field(False, description="Log from every rank, not only rank 0.")
    peak_flops_per_device: Annotated[float, Field(gt=0, le=1e18)] | None = Field(
        None, description="For MFU; default: 989e12 (H100 bf16) on GPU, measured on CPU."
    )
    sample_prompts: list[Annotated[str, Field(min_length=1, max_length=2000)]] = Field(
        default_factory=list, max_length=16, description="Prompts continued greedily every sample_interval steps."
    )
    sample_interval: Count = Field(1000, description="Steps between text samples (and at the last step).")
    sample_tokens: Annotated[int, Field(gt=0, le=1024)] = Field(32, description="New tokens per sample.")
    profile_memory_steps: Annotated[int, Field(ge=0, le=1000)] = Field(
        0,
        description="Measure each rank's peak allocated memory over the first N steps and write it to "
        "<run_dir>/memory/rank<R>.json (the check of `parcae validate --memory`). On CPU every allocation is "
        "recorded with torch.profiler, which is slow: a few steps.",
    )


class DownstreamSpec(Spec):
    """Downstream evaluation during training (CORE / Core-Extended of an eval bundle), off without a bundle."""

    bundle: str | None = Field(
        None,
        description="Eval bundle: a folder, its .zip, or an s3:// prefix (core.yaml, eval_meta_data.csv, eval_data/).",
    )
    tasks: list[Literal["core", "core-extended"]] = Field(default_factory=lambda: ["core"], min_length=1, max_length=2)
    interval_steps: Count = Field(5000, description="Steps between downstream evaluations (and at the last step).")
    max_per_task: Annotated[int, Field(gt=0, le=10**7)] | None = Field(
        100, description="Items per task (shuffled once with a fixed seed, then cut); None = all."
    )
    seeds: list[Annotated[int, Field(ge=0, le=2**31)]] = Field(
        default_factory=lambda: [1234], min_length=1, max_length=16, description="Few-shot seeds."
    )
    batch_tokens: Annotated[int, Field(gt=0, le=2**24)] = Field(8192, description="Tokens per scoring forward.")


class EvalSpec(Spec):
    interval_steps: Count = 1000
    loop_counts: list[Annotated[int, Field(gt=0, le=MAX_LOOPS)]] = Field(
        default_factory=lambda: [1, 2, 4, 8], min_length=1, max_length=64
    )
    max_batches: Annotated[int, Field(gt=0, le=10**6)] = Field(
        50, description="pipeline protocol: at most this many batches."
    )
    protocol: Literal["pipeline", "paper"] = Field(
        "pipeline",
        description="pipeline: packed rows, h0 = 0 (reproducible); paper: the reference's, one held-out document "
        "per row, like-init h0 averaged over h0_seeds seeds (val_loss_loops_T_std is the spread).",
    )
    h0_seeds: Annotated[int, Field(gt=0, le=64)] = Field(3, description="paper protocol: like-init h0 seeds.")
    documents: Annotated[int, Field(gt=0, le=10**6)] = Field(1000, description="paper protocol: documents scored.")
    downstream: DownstreamSpec = Field(default_factory=DownstreamSpec)


class StorageSpec(Spec):
    """S3-compatible storage. Credentials come from the environment only (AWS_ACCESS_KEY_ID, ...)."""

    endpoint_url: str | None = Field(None, description="e.g. http://127.0.0.1:9000 for MinIO; None = AWS.")
    region: str = "us-east-1"
    max_retries: Annotated[int, Field(ge=0, le=100)] = 5

    @field_validator("endpoint_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        if value == "" or value is None:
            return None
        if not isinstance(value, str) or not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
            raise ValueError("must be an http:// or https:// URL, e.g. http://127.0.0.1:9000")
        return value

    def s3_options(self, endpoint_url: str | None = None) -> S3Options:
        """What boto3 is given: ``endpoint_url`` (a command's --endpoint-url), else this endpoint, else
        AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS; this region, else AWS_DEFAULT_REGION."""
        return S3Options.from_env(endpoint_url or self.endpoint_url, self.region, self.max_retries)


def s3_options(endpoint_url: str | None, spec: JobSpec | None = None) -> S3Options:
    """Every command's S3 options, from one place: --endpoint-url, else the spec's storage.endpoint_url (the
    one given, else the run's), else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS."""
    return spec.storage.s3_options(endpoint_url) if spec else S3Options.from_env(endpoint_url)


GPU_CPUS_PER_TASK = 4


class ClusterSpec(Spec):
    """Where the ranks run: one machine or a Slurm allocation."""

    nodes: Annotated[int, Field(gt=0, le=10**5)] = 1
    min_nodes: Annotated[int, Field(gt=0, le=10**5)] | None = Field(
        None,
        description="Slurm: accept an allocation of min_nodes to nodes nodes (--nodes=min-max); the job trains on "
        "what it gets, the global batch kept (training.global_batch_size), resuming its checkpoint on that world size.",
    )
    procs_per_node: Annotated[int, Field(gt=0, le=1024)] = Field(1, description="Ranks (GPUs) per node.")
    cpus_per_task: Annotated[int, Field(gt=0, le=4096)] | None = Field(
        None,
        description=f"CPUs per rank; default {GPU_CPUS_PER_TASK} with training.device cuda (the rank, its shard "
        "reader, NCCL's threads), else Slurm's default.",
    )
    gpus_per_node: Annotated[int, Field(gt=0, le=64)] | None = Field(
        None, description="GPUs to request per node; default procs_per_node (one per rank) with training.device cuda."
    )
    gpu_request: Literal["gpus-per-node", "gres"] = Field(
        "gpus-per-node",
        description="How the batch script asks for GPUs: --gpus-per-node=N or --gres=gpu:N (older clusters).",
    )
    gpu_type: Annotated[str, Field(pattern=NAME_PATTERN)] | None = Field(
        None, description="A GPU type the cluster names in its GRES, e.g. a100: --gpus-per-node=a100:N."
    )
    partition: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    account: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    qos: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    constraint: Annotated[str, Field(pattern=r"^[A-Za-z0-9_&|,\[\]*:()-]+$")] | None = None
    time_limit: Annotated[str, Field(pattern=SLURM_TIME_PATTERN)] | None = Field(
        None, description="Slurm --time, e.g. 2-00:00:00 or 90 (minutes)."
    )
    requeue: bool = True
    max_requeues: Annotated[int, Field(ge=0, le=1000)] = Field(
        3, description="Requeues allowed after failures that are not preemption."
    )
    signal_seconds: Annotated[int, Field(gt=0, le=86400)] = Field(
        120, description="Warning signal USR1 this long before the limit."
    )
    extra_sbatch: list[Annotated[str, Field(pattern=r"^--[A-Za-z][A-Za-z-]*(=[^\n\r\x00]*)?$")]] = Field(
        default_factory=list, description="Extra sbatch options, one per line, e.g. --exclusive or --mem=0."
    )
    setup_lines: list[SafeLine] = Field(default_factory=list, description="Shell lines run before training.")

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @model_validator(mode="after")
    def _node_range(self) -> ClusterSpec:
        if self.min_nodes is not None and self.min_nodes > self.nodes:
            message = f"more than cluster.nodes ({self.nodes}): the range is min_nodes to nodes"
            raise RuleViolations([Problem("min_nodes", self.min_nodes, message, ("min_nodes", "nodes"))])
        return self

    @field_validator("time_limit", mode="before")
    @classmethod
    def _quoted_time(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            raise ValueError(
                f"write the time limit as a quoted string, e.g. '90' or '2-00:00:00': YAML reads an unquoted "
                f"H:MM as a number in base 60 (here {value}), which Slurm would take as minutes"
            )
        return value


class JobSpec(Spec):
    """One pretraining job."""

    name: Annotated[str, Field(pattern=NAME_PATTERN, description="Run name (letters, digits, . _ -).")]
    run_dir: str | None = Field(None, description="Default: runs/<name>.")
    model: ModelSpec = Field(default_factory=ModelSpec)
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    data: DataSpec
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    training: TrainingSpec
    zero: ZeroSpec = Field(default_factory=ZeroSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    logging: LoggingSpec = Field(default_factory=LoggingSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)

    @model_validator(mode="after")
    def _cross(self) -> JobSpec:
        problems = batch_problems(self.training, self.cluster.world_size)
        problems += node_range_problems(self.training, self.cluster) if not problems else []
        if self.data.seq_len > self.model.max_seq_len:
            message = f"exceeds the model's context model.max_seq_len={self.model.max_seq_len}"
            deps = ("data.seq_len", "model.max_seq_len")
            problems.append(Problem("data.seq_len", self.data.seq_len, message, deps))
        cluster = self.cluster
        if self.training.device == "cuda":
            if cluster.gpus_per_node is None:
                cluster.gpus_per_node = cluster.procs_per_node  # one GPU per rank
            if cluster.cpus_per_task is None:
                cluster.cpus_per_task = GPU_CPUS_PER_TASK
            if cluster.gpus_per_node < cluster.procs_per_node:
                message = f"fewer GPUs than ranks per node (procs_per_node {cluster.procs_per_node}): one rank per GPU"
                deps = ("cluster.gpus_per_node", "cluster.procs_per_node", "training.device")
                problems.append(Problem("cluster.gpus_per_node", cluster.gpus_per_node, message, deps))
        elif cluster.gpus_per_node and self.training.device == "cpu":
            message = "GPUs requested for a run that trains on CPUs (training.device: cpu); leave gpus_per_node out"
            deps = ("cluster.gpus_per_node", "training.device")
            problems.append(Problem("cluster.gpus_per_node", cluster.gpus_per_node, message, deps))
        if self.optimizer.name == "muon" and (self.zero.stage in (1, 2) or self.zero.offload_optimizer):
            message = (
                "the reference's Muon runs under zero.stage 3 (or 0) without optimizer offload; "
                "muon-deepspeed (DeepSpeed's plain Muon) runs under stages 1-3"
            )
            deps = ("optimizer.name", "zero.stage", "zero.offload_optimizer")
            problems.append(Problem("optimizer.name", self.optimizer.name, message, deps))
        if problems:
            raise RuleViolations(problems)
        if self.run_dir is None:
            self.run_dir = f"runs/{self.name}"
        if self.checkpoint.dir is None:
            self.checkpoint.dir = f"{self.run_dir.rstrip('/')}/checkpoints"
        if self.checkpoint.staging_dir is None and self.checkpoint.dir.startswith("s3://"):
            self.checkpoint.staging_dir = f"{self.run_dir.rstrip('/')}/checkpoint-staging"
        if self.logging.tensorboard_dir is None:
            self.logging.tensorboard_dir = f"{self.run_dir.rstrip('/')}/tensorboard"
        return self

    # Derived quantities (plain functions of the spec; no state).
    @property
    def world_size(self) -> int:
        return self.cluster.world_size

    @property
    def tokens_per_step(self) -> int:
        assert self.training.global_batch_size is not None
        return self.training.global_batch_size * self.data.seq_len

    @property
    def total_steps(self) -> int:
        if self.training.total_steps is not None:
            return self.training.total_steps
        assert self.training.total_tokens is not None
        return -(-self.training.total_tokens // self.tokens_per_step)


def node_range_problems(training: TrainingSpec, cluster: ClusterSpec) -> list[Problem]:
    """With ``cluster.min_nodes``, every node count of the range must form the global batch with the micro
    batch size (the accumulation follows), or an allocation of that size could not train."""
    if cluster.min_nodes is None:
        return []
    assert training.global_batch_size is not None and training.micro_batch_size is not None
    rows = training.micro_batch_size * cluster.procs_per_node
    bad = [n for n in range(cluster.min_nodes, cluster.nodes) if training.global_batch_size % (rows * n)]
    if not bad:
        return []
    message = (
        f"on {', '.join(map(str, bad))} node(s) the global batch {training.global_batch_size} is not a multiple of "
        f"micro_batch_size x procs_per_node x nodes ({training.micro_batch_size} x {cluster.procs_per_node} x n): "
        "narrow the range, or choose a global batch every node count divides"
    )
    deps = ("cluster.min_nodes", "cluster.nodes", "training.global_batch_size", "training.micro_batch_size")
    return [Problem("cluster.min_nodes", cluster.min_nodes, message, deps)]


def batch_problems(training: TrainingSpec, world_size: int) -> list[Problem]:
    """global = micro x accumulation x world size: derive the missing one in place, or report why not."""
    micro, glob, accum = (
        training.micro_batch_size,
        training.global_batch_size,
        training.gradient_accumulation_steps,
    )
    batch_keys = ("micro_batch_size", "global_batch_size", "gradient_accumulation_steps")
    deps = (*(f"training.{k}" for k in batch_keys), "cluster.nodes", "cluster.procs_per_node")
    rule = f"global = micro x accumulation x world size, world size {world_size} = cluster.nodes x procs_per_node"
    glob_path = "training.global_batch_size"
    if micro is None and (glob is None or accum is None):
        message = "required unless both global_batch_size and gradient_accumulation_steps are set"
        return [Problem("training.micro_batch_size", None, message, deps)]
    if micro is None:
        assert glob is not None and accum is not None
        if glob % (accum * world_size):
            message = f"not divisible by accumulation x world size ({accum} x {world_size}); {rule}"
            return [Problem(glob_path, glob, message, deps)]
        micro = glob // (accum * world_size)
    elif glob is None:
        accum = accum or 1
        glob = micro * accum * world_size
    elif accum is None:
        if glob % (micro * world_size):
            message = f"not divisible by micro_batch_size x world size ({micro} x {world_size}); {rule}"
            return [Problem(glob_path, glob, message, deps)]
        accum = glob // (micro * world_size)
    elif glob != micro * accum * world_size:
        message = f"inconsistent: {micro} x {accum} x {world_size} = {micro * accum * world_size}; {rule}"
        return [Problem(glob_path, glob, message, deps)]
    training.micro_batch_size, training.global_batch_size = micro, glob
    training.gradient_accumulation_steps = accum
    return []


def find_spec_class(path: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The Spec class that owns the last key of ``path`` (for suggesting the closest valid key)."""
    cls: type[BaseModel] = JobSpec
    for key in path[:-1]:
        field = cls.model_fields.get(str(key))
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        cls = nested[0]
    return cls
