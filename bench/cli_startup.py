"""CPU seconds a command spends before its work: loading a model, `parcae validate`, against a bare
`import torch`, in fresh interpreters, side by side (median of --rounds, alternating).

Every `parcae eval`, `generate`, `export` and `import` builds a model on the meta device and allocates it
before reading weights into it. That used to import torch._dynamo (nn.Embedding's own N(0, 1) draw on the
meta device) and sympy (`Module.to_empty` goes through PyTorch's reference ops): the old path is rebuilt here
beside the current one (`model.empty_model`). `parcae validate` used to import torch (the sources' description
and the checkpoint module); now it imports none.

    .venv/bin/python bench/cli_startup.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

LOAD = """
import sys
from model import load_pretrained
model = load_pretrained({path!r})
print('torch._dynamo' in sys.modules, 'sympy' in sys.modules)
"""

OLD_LOAD = """
import sys, torch
from torch import nn
import model.parcae as parcae
from model.weights import load_state, read_weights
parcae.Embedding.reset_parameters = nn.Embedding.reset_parameters  # the draw it made before
cfg, tensors = read_weights({path!r})
with torch.device("meta"):
    model = parcae.ParcaeLM(cfg)
model.to_empty(device="cpu")
load_state(model, tensors, {path!r})
print('torch._dynamo' in sys.modules, 'sympy' in sys.modules)
"""


def cpu_of(cmd: list[str]) -> tuple[float, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from model import build_model, save_reference
    from pipeline.jobspec import load_spec

    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_spec(REPO / "configs" / "demo-tiny.yaml").spec.model.build()
        weights = str(save_reference(build_model(cfg, seed=0), Path(tmp) / "w.safetensors"))
        commands = {
            "import torch": [py, "-c", "import torch"],
            "load weights (model.empty_model)": [py, "-c", LOAD.format(path=weights)],
            "load weights (to_empty, Embedding's draw)": [py, "-c", OLD_LOAD.format(path=weights)],
            "parcae validate configs/demo-tiny.yaml": [py, "-m", "pipeline", "validate", "configs/demo-tiny.yaml"],
        }
        seconds: dict[str, list[float]] = {name: [] for name in commands}
        imports: dict[str, str] = {}
        for _ in range(args.rounds):
            for name, cmd in commands.items():
                cpu, out = cpu_of(cmd)
                seconds[name].append(cpu)
                if name.startswith("load"):
                    dynamo, sympy = out.split()[-2:]
                    imports[name] = f"imported torch._dynamo: {dynamo}, sympy: {sympy}"
    floor = statistics.median(seconds["import torch"])
    print(f"CPU seconds, median of {args.rounds} fresh interpreters each (alternating)")
    print(f"{'':46} {'CPU s':>7} {'x import torch':>15}")
    for name, values in seconds.items():
        cpu = statistics.median(values)
        print(f"{name:46} {cpu:7.2f} {cpu / floor:15.2f}  {imports.get(name, '')}")
    old = statistics.median(seconds["load weights (to_empty, Embedding's draw)"])
    new = statistics.median(seconds["load weights (model.empty_model)"])
    print(f"loading a model: {new:.2f} s now, {old:.2f} s before ({old - new:.2f} s less, ratio {new / old:.2f})")


if __name__ == "__main__":
    main()
