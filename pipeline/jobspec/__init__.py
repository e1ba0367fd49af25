"""Job specs: the plain-data Pydantic models (`schema`) and how a spec file becomes one (`load`).

The bottom layer of `pipeline/`: it imports `model.config` (the model's fields are declared there
once) and `data_prep.storage` (what a `StorageSpec` builds), nothing else of the pipeline.
"""

from pipeline.jobspec.load import LoadedSpec, SpecError, load_spec
from pipeline.jobspec.run_dir import load_run_spec
from pipeline.jobspec.schema import (
    CheckpointSpec,
    ClusterSpec,
    DataSpec,
    DownstreamSpec,
    EvalSpec,
    JobSpec,
    LoggingSpec,
    ModelSpec,
    OptimizerSpec,
    ScheduleSpec,
    SourceSpec,
    StorageSpec,
    TrainingSpec,
    ZeroSpec,
    s3_options,
)

__all__ = [
    "CheckpointSpec",
    "ClusterSpec",
    "DataSpec",
    "DownstreamSpec",
    "EvalSpec",
    "JobSpec",
    "LoadedSpec",
    "LoggingSpec",
    "ModelSpec",
    "OptimizerSpec",
    "ScheduleSpec",
    "SourceSpec",
    "SpecError",
    "StorageSpec",
    "TrainingSpec",
    "ZeroSpec",
    "load_run_spec",
    "load_spec",
    "s3_options",
]
