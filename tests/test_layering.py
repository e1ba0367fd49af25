"""Dependency direction, checked on the source (imports anywhere in a file, function-level ones included)
and by importing the packages in a fresh interpreter:

- model/ imports torch, its own files and the error root only; data_prep/ neither model/ nor pipeline/;
  only pipeline/ imports deepspeed; `parcae_errors` imports nothing of the project.
- inside pipeline/ the subpackages form layers, each importing only those below it:
  jobspec < data < evaluation < training < jobs < cli (and no file imports another that imports it back).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_run

FORBIDDEN = {
    "model": {"deepspeed", "pipeline", "data_prep", "webdataset", "boto3"},
    "data_prep": {"deepspeed", "pipeline", "model", "torch"},
}
PIPELINE_LAYERS = ["jobspec", "data", "evaluation", "training", "jobs", "cli"]


def imports(path: Path) -> set[str]:
    """Absolute module names a file imports (``from a.b import c`` counts as ``a.b`` and ``a.b.c``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_forbidden_roots(package):
    files = sorted((REPO / package).rglob("*.py"))
    assert files
    for path in files:
        bad = {name.split(".")[0] for name in imports(path)} & FORBIDDEN[package]
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_the_error_root_imports_nothing_of_the_project():
    roots = {name.split(".")[0] for name in imports(REPO / "parcae_errors.py")}
    assert not roots & {"model", "data_prep", "pipeline", "torch", "deepspeed"}


def layer(name: str) -> int | None:
    parts = name.split(".")
    if parts[0] != "pipeline" or len(parts) < 2 or parts[1] not in PIPELINE_LAYERS:
        return None
    return PIPELINE_LAYERS.index(parts[1])


def test_pipeline_subpackages_import_only_lower_layers():
    files = sorted((REPO / "pipeline").rglob("*.py"))
    top = {p.name for p in (REPO / "pipeline").iterdir() if p.suffix == ".py"}
    assert top == {"__init__.py", "__main__.py"}, f"pipeline/ files belong in a layer: {sorted(top)}"
    assert {p.name for p in (REPO / "pipeline").iterdir() if p.is_dir() and p.name != "__pycache__"} == set(
        PIPELINE_LAYERS
    )
    for path in files:
        own = layer(module_name(path))
        if own is None:
            continue
        for name in imports(path):
            other = layer(name)
            assert other is None or other <= own, (
                f"{path.relative_to(REPO)} ({PIPELINE_LAYERS[own]}) imports {name} ({PIPELINE_LAYERS[other]}), "
                f"a layer above it; the order is {' < '.join(PIPELINE_LAYERS)}"
            )


def test_no_import_circles_between_files():
    modules = {module_name(p): p for p in sorted((REPO / "pipeline").rglob("*.py"))}
    edges = {
        name: {m for m in (imports(path)) if m in modules and m != name and not name.startswith(m + ".")}
        for name, path in modules.items()
    }
    # package __init__ files that only re-export their own modules are not part of a circle
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                circle = stack[stack.index(nxt) :] + [nxt] if nxt in stack else [node, nxt]
                raise AssertionError(f"import circle: {' -> '.join(circle)}")
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in modules:
        if name not in state:
            visit(name, [name])


def test_the_model_builds_and_loads_without_deepspeed_or_the_compiler(tmp_path):
    """Importing the model loads neither DeepSpeed nor the pipeline; building one (on the meta device, then
    allocated) and loading weights into it imports neither torch._dynamo nor sympy: `parcae eval`, `generate`,
    `export` and `import` do exactly this, and those imports cost 1.2 s of each (nn.Embedding's own draw on
    the meta device imported dynamo, `Module.to_empty` imported sympy)."""
    code = f"""
import sys, model, model.parcae
print('deepspeed' in sys.modules, 'pipeline' in sys.modules)
from model import ParcaeConfig, build_model, load_pretrained, save_reference
cfg = ParcaeConfig(vocab_size=256, d_model=64, n_head=2, n_prelude=1, n_core=2, n_coda=1, max_seq_len=64)
load_pretrained(save_reference(build_model(cfg), {str(tmp_path / "w.safetensors")!r}))
print('torch._dynamo' in sys.modules, 'sympy' in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "False", "False", "False"], out.stdout


def test_the_command_line_and_the_launcher_start_without_torch(tmp_path, tiny_shards):
    """`parcae --help`, `parcae validate` (its sources read from their manifests), the Slurm commands
    (`submit`, `status`, `cancel`, the `slurm-job` wrapper of every node) and the launcher of `parcae train`
    (it reads the spec and the manifests, then starts the ranks) import no torch: its import is most of a
    second or two of every command, paid before a single rank can start. A launch whose preflight refuses the
    data is run here."""
    spec = str(REPO / "configs" / "demo-tiny.yaml")
    code = f"""
import sys
import pipeline.cli, pipeline.jobs.launch, pipeline.jobs.slurm
assert 'torch' not in sys.modules, 'importing the command line imported torch'
code = pipeline.cli.main(['validate', {spec!r}, *{tiny_run(tiny_shards, tmp_path / "run", 10)!r}])
assert code == 0, code
assert 'torch' not in sys.modules, 'parcae validate imported torch'
from parcae_errors import ParcaeError
try:
    pipeline.jobs.launch.run_train({spec!r},
        ['data.train_url={tmp_path}/none/train', 'data.val_url=null', 'tokenizer.path=null', 'run_dir={tmp_path}/run'])
except ParcaeError as exc:
    print('refused:', str(exc).splitlines()[0])
print('torch' in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "train: " + str(tiny_shards / "train") in out.stdout  # the sources' line: their manifests were read
    assert "refused:" in out.stdout and out.stdout.split()[-1] == "False", out.stdout


def test_the_trainer_reads_as_steps():
    """No method of `Trainer` is longer than 60 lines: the loop is a list of named steps, and what has
    state registers with the checkpointer instead of being assembled by hand in a save or a resume."""
    tree = ast.parse((REPO / "pipeline" / "training" / "trainer.py").read_text())
    (trainer,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer"]
    long = {f.name: f.end_lineno - f.lineno + 1 for f in trainer.body if isinstance(f, ast.FunctionDef)}
    assert all(n <= 60 for n in long.values()), {k: v for k, v in long.items() if v > 60}
    assert "def save(" not in ast.unparse(trainer), "checkpoint state belongs to the parts (Checkpointer.register)"


def test_jobs_return_data_and_the_command_line_prints():
    """One rule for the boundary: a job (`pipeline/jobs/`) returns what it did, or hands progress lines to a
    ``say`` callback; only `pipeline/cli/` writes to the terminal. So every job can be called from code (a
    notebook, a test, another job) without output it did not ask for."""
    printing = []
    for path in sorted((REPO / "pipeline" / "jobs").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                printing.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not printing, printing
