"""The offline install of a compute node, end to end: `make wheelhouse` on a machine that reaches the package
index, then `make setup WHEELHOUSE=DIR TORCH_SPEC=system` in a fresh venv with the network cut off, over a
"site" torch that the set-up must keep; the installed `parcae` then trains a step.

The site torch is what a cluster's PyTorch module gives: torch and what it needs, on PYTHONPATH (here links to
this checkout's own torch, so nothing large is copied). The network is cut the way pip sees it: no index
(--no-index), no pip configuration of this machine (its find-links and extra indexes), and a proxy on a closed
loopback port for anything that would still try HTTP. The wheelhouse holds the core dependencies only
(EXTRAS empty): the extras resolve the same way and would add a few minutes of downloads to every CI run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, train_cmd

pytestmark = pytest.mark.slow


def site_torch(out: Path) -> None:
    """Links to torch and everything it requires (its distributions' top-level files) in ``out``."""
    out.mkdir()
    seen, todo = set(), ["torch"]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        dist = metadata.distribution(name)
        todo += [re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0] for r in dist.requires or [] if "extra ==" not in r]
        for top in {Path(f).parts[0] for f in dist.files or []}:
            source = Path(dist.locate_file(top))
            if source.exists() and not top.endswith(".pth") and top not in {"..", "__pycache__"}:
                (out / top).symlink_to(source)


def offline_env(site: Path) -> dict[str, str]:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: any HTTP attempt fails at once
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k.lower() not in ("no_proxy",)}
    env.update(PIP_CONFIG_FILE=os.devnull, PYTHONPATH=str(site), DS_ACCELERATOR="cpu")
    env.update({name: dead for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")})
    return env


@pytest.mark.heavy
def test_wheelhouse_installs_offline_over_the_site_torch_and_trains(tmp_path, tiny_shards):
    wheelhouse, venv = tmp_path / "wheelhouse", tmp_path / "venv"
    made = subprocess.run(
        ["make", "wheelhouse", f"WHEELHOUSE={wheelhouse}", "EXTRAS="], cwd=REPO, capture_output=True, text=True
    )
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-3000:]
    summary = json.loads((wheelhouse / "wheelhouse.json").read_text())
    assert summary["torch"] is None and not list(wheelhouse.glob("torch-*.whl"))  # the site's torch stays
    assert {"deepspeed", "parcae-pipeline"} <= set(summary["built_here"])
    assert list(wheelhouse.glob("deepspeed-*-py3-none-any.whl"))  # pure Python: ops JIT-compile where they run

    site_torch(tmp_path / "site")
    env = offline_env(tmp_path / "site")
    base_python = getattr(sys, "_base_executable", sys.executable)  # not this venv: a bare interpreter
    setup = [
        "make", "setup", f"VENV={venv}", f"PYTHON={base_python}", "TORCH_SPEC=system",
        f"WHEELHOUSE={wheelhouse}", "EXTRAS=",
    ]  # fmt: skip
    done = subprocess.run(setup, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "keeping the site's torch" in done.stdout
    assert not list(venv.glob("lib/python*/site-packages/torch"))  # not installed into the venv: the site's
    torch_file = subprocess.run(
        [venv / "bin/python", "-c", "import torch; print(torch.__file__)"], env=env, capture_output=True, text=True
    ).stdout
    assert str(tmp_path / "site") in torch_file

    helped = subprocess.run([venv / "bin/parcae", "--help"], env=env, capture_output=True, text=True)
    assert helped.returncode == 0 and "train" in helped.stdout, helped.stderr
    cmd = train_cmd(tiny_shards, tmp_path / "run", 1, "cluster.procs_per_node=1")
    trained = subprocess.run([venv / "bin/parcae", *cmd[3:]], cwd=REPO, env=env, capture_output=True, text=True)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("step") == 1 and r.get("loss", 0) > 0 for r in records)


def test_setup_refuses_what_it_cannot_install_with_the_fix(tmp_path):
    """No wheelhouse.json, a wheelhouse without torch when torch is to be installed, no site torch: each a
    clear message naming the variable and what to do, exit 2, nothing half-installed over."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    base_python = getattr(sys, "_base_executable", sys.executable)
    (tmp_path / "empty").mkdir()
    (tmp_path / "no-torch").mkdir()
    (tmp_path / "no-torch" / "wheelhouse.json").write_text("{}")
    cases = [
        (["WHEELHOUSE=" + str(tmp_path / "empty")], "no wheelhouse.json there; make one with `make wheelhouse"),
        (["WHEELHOUSE=" + str(tmp_path / "no-torch")], "holds no torch wheel: use the site"),
        (["TORCH_SPEC=system"], "TORCH_SPEC=system: no torch importable by"),
    ]
    for i, (variables, message) in enumerate(cases):
        venv = tmp_path / f"venv{i}"
        done = subprocess.run(
            ["tools/setup.sh"],
            cwd=REPO,
            env={**env, "VENV": str(venv), "PYTHON": base_python, **dict(v.split("=", 1) for v in variables)},
            capture_output=True,
            text=True,
        )
        assert done.returncode == 2 and message in done.stderr, (variables, done.stderr)
        assert not (venv / ".parcae-setup-done").exists()


def test_a_foreign_target_admits_every_older_manylinux_wheel():
    """`make wheelhouse PY=3.12 PLATFORM=manylinux_2_28_x86_64`: pip compares platform tags as given, so the
    target lists every older glibc's tag and the legacy aliases (a manylinux2014 or manylinux1 wheel runs on a
    glibc 2.28 node). Checked by hand on 2026-12-07: that target's core wheelhouse held cp312 and abi3 wheels
    only, 53 of them, in 89 s (too long for every CI run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("wheelhouse", REPO / "tools" / "wheelhouse.py")
    wheelhouse = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wheelhouse)
    tags = wheelhouse.platform_tags("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_5_x86_64" in tags and "manylinux_2_29_x86_64" not in tags
    assert {"manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert wheelhouse.platform_tags("manylinux_2_12_aarch64")[-2:] == ["manylinux2010_aarch64", "manylinux1_aarch64"]
    assert wheelhouse.platform_tags("macosx_14_0_arm64") == ["macosx_14_0_arm64"]
    options = wheelhouse.target_options("3.12", "manylinux_2_17_x86_64")
    assert options[:5] == ["--only-binary=:all:", "--implementation", "cp", "--python-version", "3.12"]
    assert wheelhouse.target_options(None, None) == []  # this machine: sdists allowed, built into wheels
    with pytest.raises(wheelhouse.WheelhouseError, match="PY=312: give a Python version as 3.12"):
        wheelhouse.target_options("312", None)
