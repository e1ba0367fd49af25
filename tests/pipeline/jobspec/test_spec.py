"""Job spec rules, loaded from real YAML files."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from pipeline.jobspec import JobSpec, SpecError, load_spec

MINIMAL = """
name: t
data: {train_url: s3://bucket/train}
training: {micro_batch_size: 4, total_steps: 10}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def problems(tmp_path: Path, text: str, overrides=(), environ=None) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text), overrides, environ or {})
    return info.value.problems


def test_minimal_spec_fills_defaults_and_derives_batch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_spec(write(tmp_path, MINIMAL), environ={}).spec
    assert spec.training.gradient_accumulation_steps == 1
    assert spec.training.global_batch_size == 4
    assert spec.run_dir == f"{tmp_path}/runs/t"  # relative paths start from the current directory
    assert spec.checkpoint.dir == f"{tmp_path}/runs/t/checkpoints"
    assert spec.logging.tensorboard_dir == f"{tmp_path}/runs/t/tensorboard"
    assert spec.model.injection == "diagonal" and spec.model.mean_recurrence == 8


@pytest.mark.parametrize(
    "training, cluster, expected",
    [
        ({"micro_batch_size": 4, "gradient_accumulation_steps": 2}, {"procs_per_node": 2}, (4, 16, 2)),
        ({"micro_batch_size": 4, "global_batch_size": 32}, {"nodes": 2, "procs_per_node": 2}, (4, 32, 2)),
        ({"global_batch_size": 32, "gradient_accumulation_steps": 4}, {"procs_per_node": 2}, (4, 32, 4)),
        ({"micro_batch_size": 2, "global_batch_size": 8, "gradient_accumulation_steps": 4}, {}, (2, 8, 4)),
    ],
)
def test_batch_arithmetic_derives_the_missing_value(tmp_path, training, cluster, expected):
    data = {
        "name": "t",
        "data": {"train_url": "x"},
        "cluster": cluster,
        "training": {**training, "total_steps": 1},
    }
    spec = JobSpec.model_validate(data)
    t = spec.training
    assert (t.micro_batch_size, t.global_batch_size, t.gradient_accumulation_steps) == expected


def test_inconsistent_batch_is_rejected_with_the_arithmetic(tmp_path):
    found = problems(
        tmp_path,
        """
        name: t
        data: {train_url: x}
        training: {micro_batch_size: 4, global_batch_size: 10, gradient_accumulation_steps: 2, total_steps: 1}
        cluster: {procs_per_node: 2}
    """,
    )
    assert len(found) == 1
    assert found[0].startswith("training.global_batch_size: inconsistent: 4 x 2 x 2 = 16")
    assert "(got 10)" in found[0]


def test_indivisible_global_batch(tmp_path):
    found = problems(
        tmp_path,
        """
        name: t
        data: {train_url: x}
        training: {micro_batch_size: 3, global_batch_size: 16, total_steps: 1}
    """,
    )
    assert found[0].startswith("training.global_batch_size: not divisible by micro_batch_size x world size")


def test_typo_names_dotted_path_and_closest_key(tmp_path):
    found = problems(tmp_path, MINIMAL + "model: {mean_recurence: 4}\n")
    assert found == ["model.mean_recurence: unknown key (did you mean 'model.mean_recurrence'?)"]


def test_unknown_top_level_section(tmp_path):
    found = problems(tmp_path, MINIMAL + "optimiser: {lr: 1}\n")
    assert found == ["optimiser: unknown key (did you mean 'optimizer'?)"]


def test_wrong_type_shows_value_and_what_is_accepted(tmp_path):
    found = problems(tmp_path, MINIMAL + "model: {injection: diag, d_model: big}\n")
    assert "model.injection: Input should be 'diagonal', 'add' or 'concat' (got 'diag')" in found
    assert any(p.startswith("model.d_model: Input should be a valid integer") and "'big'" in p for p in found)


def test_missing_section_and_key(tmp_path):
    found = problems(tmp_path, "name: t\ntraining: {micro_batch_size: 1, total_steps: 1}\n")
    assert found == ["data: required section is missing"]
    found = problems(tmp_path, "name: t\ndata: {seq_len: 8}\ntraining: {micro_batch_size: 1, total_steps: 1}\n")
    assert found == ["data.train_url: required: data.train_url (one shard set) or data.sources (a mixture) (got None)"]


def test_every_problem_is_reported_at_once(tmp_path):
    found = problems(
        tmp_path,
        """
        name: bad name
        model: {d_model: 100, n_head: 3, mean_recurrence: 2, mean_backprop_depth: 4, injection: diag}
        data: {train_url: x, seq_len: 4096}
        training: {micro_batch: 4, total_steps: 10, total_tokens: 10}
        eval: {loop_counts: [0, 2]}
    """,
    )
    paths = [p.split(":")[0] for p in found]
    assert paths == [
        "name",
        "model.injection",
        "training.micro_batch",
        "eval.loop_counts.0",
        "model.n_head",
        "model.mean_backprop_depth",
        "training.total_steps",
        "training.micro_batch_size",
        "data.seq_len",
    ]


def test_cross_field_rules(tmp_path):
    found = problems(
        tmp_path,
        """
        name: t
        model: {d_model: 96, n_head: 5, mean_recurrence: 2, mean_backprop_depth: 3, max_seq_len: 64}
        data: {train_url: x, seq_len: 128}
        training: {micro_batch_size: 1, total_steps: 1}
        zero: {stage: 2, offload_params: true}
    """,
    )
    assert "model.n_head: must divide d_model=96 (got 5)" in found
    assert "model.mean_backprop_depth: must be <= model.mean_recurrence (2) (got 3)" in found
    assert "zero.offload_params: needs zero.stage 3 (stage is 2) (got True)" in found
    assert "data.seq_len: exceeds the model's context model.max_seq_len=64 (got 128)" in found


def test_exactly_one_run_length(tmp_path):
    found = problems(tmp_path, "name: t\ndata: {train_url: x}\ntraining: {micro_batch_size: 1}\n")
    assert found == [
        "training.total_steps: set exactly one of training.total_steps / training.total_tokens "
        "(got {'total_steps': None, 'total_tokens': None})"
    ]


def test_gpt_rejects_loop_settings(tmp_path):
    found = problems(tmp_path, MINIMAL + "model: {arch: gpt, n_layers: 4, mean_recurrence: 4}\n")
    assert found[0].startswith("model.mean_recurrence: only applies to arch=parcae")


def test_loop_counts_must_be_positive(tmp_path):
    found = problems(tmp_path, MINIMAL + "eval: {loop_counts: [1, -2]}\n")
    assert found == ["eval.loop_counts.1: Input should be greater than 0; accepted: 1 to 1024 (got -2)"]


def test_overrides_are_validated_like_the_file(tmp_path):
    path = write(tmp_path, MINIMAL)
    spec = load_spec(path, ["model.injection=add", "eval.loop_counts=[1, 3]", "training.seed=7"], {}).spec
    assert spec.model.injection == "add" and spec.eval.loop_counts == [1, 3] and spec.training.seed == 7
    with pytest.raises(SpecError) as info:
        load_spec(path, ["training.micro_batch_sise=3", "model.injection=diag"], {})
    assert info.value.problems == [
        "model.injection: Input should be 'diagonal', 'add' or 'concat' (got 'diag')",
        "training.micro_batch_sise: unknown key (did you mean 'training.micro_batch_size'?)",
    ]
    with pytest.raises(SpecError) as info:
        load_spec(path, ["model.injection"], {})
    assert "expected a.b.c=value" in info.value.problems[0]
    with pytest.raises(SpecError) as info:
        load_spec(path, ["name.first=x"], {})
    assert info.value.problems == ["--set name.first: name is a value ('t'), not a section"]


def test_env_interpolation_with_defaults_and_missing(tmp_path):
    text = MINIMAL.replace("s3://bucket/train", "'${BUCKET}/train'") + "storage: {region: '${REGION:-eu-west-1}'}\n"
    spec = load_spec(write(tmp_path, text), environ={"BUCKET": "s3://b"}).spec
    assert spec.data.train_url == "s3://b/train" and spec.storage.region == "eu-west-1"
    found = problems(tmp_path, text, environ={})
    assert found == ["data.train_url: environment variable BUCKET is not set (set it, or write ${BUCKET:-default})"]


def test_secrets_never_appear_in_errors_or_saved_specs(tmp_path):
    secret = "s3cr3t-value-123"
    environ = {"MY_SECRET_KEY": secret}
    text = MINIMAL + "storage: {endpoint_url: 'http://u:${MY_SECRET_KEY}@127.0.0.1:9000'}\n"
    loaded = load_spec(write(tmp_path, text), environ=environ)
    assert loaded.spec.storage.endpoint_url == f"http://u:{secret}@127.0.0.1:9000"
    saved = loaded.save(tmp_path / "out" / "spec.yaml").read_text()
    assert secret not in saved and "${MY_SECRET_KEY}" in saved
    assert load_spec(tmp_path / "out" / "spec.yaml", environ=environ).spec == loaded.spec
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, MINIMAL + "model: {d_model: '${MY_SECRET_KEY}'}\n"), environ=environ)
    assert secret not in str(info.value) and "${MY_SECRET_KEY}" in str(info.value)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(SpecError, match="cannot read the spec file"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="line 2, column .*not valid YAML"):
        load_spec(write(tmp_path, "name: t\n  bad: [\n"))
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(write(tmp_path, "- a\n- b\n"))


def test_time_limit_and_names_cannot_inject_shell(tmp_path):
    found = problems(tmp_path, MINIMAL + "cluster: {time_limit: '1:00; rm -rf /', partition: 'a b'}\n")
    assert [p.split(":")[0] for p in found] == ["cluster.partition", "cluster.time_limit"]
    spec = load_spec(write(tmp_path, MINIMAL + "cluster: {time_limit: '2-00:00:00'}\n"), environ={}).spec
    assert spec.cluster.time_limit == "2-00:00:00"


def test_unquoted_time_limit_is_refused_not_misread(tmp_path):
    found = problems(tmp_path, MINIMAL + "cluster: {time_limit: 10:00}\n")
    assert len(found) == 1 and found[0].startswith("cluster.time_limit: write the time limit as a quoted")


def test_mixture_sources_are_checked_by_name(tmp_path):
    spec = """
name: t
data:
  sources:
    - {name: web, url: s3://b/web, weight: 3}
    - {name: code, url: s3://b/code, weight: 0}
    - {name: math, url: s3://b/math, weight: -2, max_epochs: 0}
training: {micro_batch_size: 4, total_steps: 10}
"""
    found = problems(tmp_path, spec)
    assert found[0].startswith("data.sources.1.weight: source 'code': weight 0.0 is not a share of rows")
    found = problems(tmp_path, spec.replace("weight: 0}", "weight: 1}"))  # (a list's first problem is reported)
    assert found[0].startswith("data.sources.2.weight: source 'math': weight -2.0")
    found = problems(tmp_path, spec.replace("weight: 0}", "weight: 1}").replace("weight: -2", "weight: 2"))
    assert found[0].startswith("data.sources.2.max_epochs: Input should be greater than 0")
    same = spec.replace("weight: 0}", "weight: 1}").replace(
        "name: math, url: s3://b/math, weight: -2, max_epochs: 0", "name: web, url: s3://b/x, weight: 1"
    )
    assert problems(tmp_path, same) == [
        "data.sources: source names must differ; 'web' repeats (got ['web', 'code', 'web'])"
    ]
    both = MINIMAL.replace(
        "data: {train_url: s3://bucket/train}",
        "data: {train_url: s3://a, sources: [{name: x, url: s3://x, weight: 1}]}",
    )
    assert problems(tmp_path, both)[0].startswith("data.train_url: set data.train_url (one shard set) or data.sources")
    loaded = load_spec(
        write(tmp_path, spec.replace("weight: 0}", "weight: 1}").replace("weight: -2, max_epochs: 0", "weight: 1")),
        environ={},
    ).spec
    assert [s.name for s in loaded.data.train_sources()] == ["web", "code", "math"]
    one = load_spec(write(tmp_path, MINIMAL), environ={}).spec.data.train_sources()
    assert [(s.name, s.url, s.weight) for s in one] == [("train", "s3://bucket/train", 1.0)]


def test_set_addresses_a_list_item_by_its_index():
    from pipeline.jobspec.load import apply_override

    data = {"data": {"sources": [{"name": "a", "url": "x"}, {"name": "b", "url": "y"}]}}
    assert apply_override(data, "data.sources.1.url=s3://b/new") is None
    assert data["data"]["sources"][1] == {"name": "b", "url": "s3://b/new"}
    assert (
        apply_override(data, "data.sources.0={name: c, url: z}") is None and data["data"]["sources"][0]["name"] == "c"
    )
    problem = apply_override(data, "data.sources.2.url=q")
    assert problem == "--set data.sources.2.url: data.sources is a list of 2; address an item by its index 0 to 1"


def test_booleans_are_not_taken_as_numbers_anywhere_in_the_spec():
    """YAML reads yes/no/on/off/true/false as booleans and pydantic would take them as 1 or 0 (total_steps
    true ran one step): refused in every section, named, with the type the field takes."""
    from pipeline.jobspec import SpecError, load_spec
    from tests.conftest import CONFIGS

    sources = "[{name: a, url: x, weight: yes}]"
    overrides = [
        "training.total_steps=true",
        "optimizer.lr=on",
        "model.d_model=true",
        "optimizer.betas=[true, 0.9]",
        "data.train_url=null",
        f"data.sources={sources}",
    ]
    with pytest.raises(SpecError) as info:
        load_spec(CONFIGS / "demo-tiny.yaml", overrides)
    text = "\n".join(info.value.problems)
    for needle in (
        "training.total_steps: expected an integer (or null), got a boolean",
        "optimizer.lr: expected a number, got a boolean",
        "model.d_model: expected an integer, got a boolean",
        "optimizer.betas: expected a list of numbers, got a boolean",
        "data.sources.0.weight: expected a number, got a boolean",
    ):
        assert needle in text, text
    assert load_spec(CONFIGS / "demo-tiny.yaml", ["training.compile=off", "logging.log_interval=5"]).spec


def test_relative_paths_start_from_the_current_directory_and_spec_dir_from_the_file(tmp_path, monkeypatch):
    """One rule for paths: a relative local path (in the file or a --set) is taken from the directory the
    command runs in and made absolute at load, so validate, train and every later reader agree;
    ${SPEC_DIR} is the spec file's directory; s3:// stays as written."""
    specs = tmp_path / "specs"
    specs.mkdir()
    spec_file = specs / "spec.yaml"
    spec_file.write_text(
        textwrap.dedent(
            """
            name: t
            tokenizer: {path: tok/t.model}
            data:
              sources:
                - {name: a, url: ../shards/a, val_url: s3://b/val, weight: 1}
                - {name: b, url: "${SPEC_DIR}/../shards/b", weight: 1}
            training: {micro_batch_size: 4, total_steps: 10}
            zero: {base_config: my/zero.json}
            checkpoint: {init_from: w.safetensors}
            eval: {downstream: {bundle: bundle.zip}}
            """
        )
    )
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    spec = load_spec(spec_file, ["checkpoint.dir=ckpt"], environ={}).spec
    assert spec.tokenizer.path == f"{work}/tok/t.model"
    assert [s.url for s in spec.data.sources] == [f"{tmp_path}/shards/a", f"{tmp_path}/shards/b"]
    assert spec.data.sources[0].val_url == "s3://b/val"
    assert spec.zero.base_config == f"{work}/my/zero.json"
    assert spec.checkpoint.init_from == f"{work}/w.safetensors"
    assert spec.checkpoint.dir == f"{work}/ckpt"
    assert spec.eval.downstream.bundle == f"{work}/bundle.zip"
    assert spec.run_dir == f"{work}/runs/t"
    assert load_spec(spec_file, environ={}).spec.zero.base_config == f"{work}/my/zero.json"
    assert load_spec(write(tmp_path, MINIMAL), ["zero.base_config=zero2"], environ={}).spec.zero.base_config == "zero2"


def test_a_moved_run_reads_its_own_files(tmp_path, monkeypatch):
    """load_run_spec: the checkpoints, staging and TensorBoard directories inside the run directory that
    wrote the spec follow the run to where it is now; locations elsewhere stay."""
    from pipeline.jobspec import load_run_spec

    monkeypatch.chdir(tmp_path)
    loaded = load_spec(write(tmp_path, MINIMAL), ["logging.tensorboard_dir=/shared/tb"], environ={})
    (tmp_path / "runs" / "t").mkdir(parents=True)
    loaded.save(tmp_path / "runs" / "t" / "spec.yaml")
    (tmp_path / "runs" / "t").rename(tmp_path / "copy")
    spec = load_run_spec(tmp_path / "copy")
    assert spec.run_dir == f"{tmp_path}/copy"
    assert spec.checkpoint.dir == f"{tmp_path}/copy/checkpoints"
    assert spec.logging.tensorboard_dir == "/shared/tb"


def test_tb_and_eval_of_a_copied_run_read_the_copy(tmp_path, monkeypatch):
    """`parcae tb COPY` serves the copy's logs (it served the original's), eval finds the copy's checkpoints."""
    from pipeline.jobs.evaluate import run_checkpoint_dir
    from pipeline.jobs.tb import _local_logdir

    monkeypatch.chdir(tmp_path)
    original = tmp_path / "runs" / "t"
    (original / "tensorboard").mkdir(parents=True)
    load_spec(write(tmp_path, MINIMAL), environ={}).save(original / "spec.yaml")
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    assert _local_logdir(str(copy)) == copy / "tensorboard"
    assert run_checkpoint_dir(copy) == str(copy / "checkpoints")
