"""`make wheelhouse`: every wheel this project and its extras need, in one directory, for a compute node
that reaches no package index (`make setup WHEELHOUSE=DIR` installs from it with pip --no-index).

All of it is pip's own machinery, run on a machine that reaches the index:
1. `pip wheel` builds the wheels no index has: this project, DeepSpeed (built from its sdist against
   the torch installed here; pure Python, its ops JIT-compile at run time on the machine that runs them)
   and any dependency published only as an sdist (pure-Python ones: rouge-score, sqlitedict, ...);
2. `pip install --dry-run --report` resolves the whole set for the target: this machine, or another
   Python version and platform (``--python 3.12 --platform manylinux_2_28_x86_64``, binary wheels only);
3. `pip download --no-deps` fetches exactly that set, less torch and its CUDA libraries (triton,
   nvidia-*, cuda-*) unless ``--torch SPEC`` asks for them: a site's own torch stays (TORCH_SPEC=system).

The directory gets ``wheelhouse.json``: the target, whether torch is in it, and every pinned wheel.

    python tools/wheelhouse.py OUT [--python 3.12] [--platform manylinux_2_28_x86_64] [--extras dev,parquet,hf]
                                   [--torch 'torch==2.13.0' [--torch-index-url URL]]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# torch and what only torch needs: left out unless --torch (the site's torch brings its own)
TORCH_FAMILY = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
BUILD_TOOLS = ["setuptools>=64", "wheel"]  # `pip install -e .` without build isolation needs them installed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--python", help="target Python version, e.g. 3.12 (default: this interpreter's)")
    parser.add_argument("--platform", help="target platform tag, e.g. manylinux_2_28_x86_64 (default: this machine)")
    parser.add_argument("--extras", default="dev,parquet,hf", help="the project's extras to include (comma list)")
    parser.add_argument("--torch", help="also a torch build, e.g. 'torch==2.13.0' (default: none, the site's)")
    parser.add_argument("--torch-index-url", help="an extra index for --torch (a CUDA wheel index)")
    args = parser.parse_args()
    try:
        summary = build(args)
    except WheelhouseError as exc:
        sys.exit(f"make wheelhouse: {exc}")
    print(
        f"wheelhouse {args.out}: {summary['wheels']} wheels for Python {summary['python']} on {summary['platform']}, "
        f"torch {'included (' + args.torch + ')' if args.torch else 'left out (TORCH_SPEC=system on the target)'}"
    )


class WheelhouseError(Exception):
    pass


def pip(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args])
    if done.returncode != 0:
        raise WheelhouseError(f"`pip {' '.join(args[:2])} ...` failed (exit {done.returncode}); its output is above")


def target_options(python: str | None, platform: str | None) -> list[str]:
    """pip's options for a foreign target: binary wheels only, for that Python and platform. A manylinux tag
    admits every older glibc's wheels too, but pip compares the tags as given: they are listed out."""
    if not python and not platform:
        return []
    options = ["--only-binary=:all:", "--implementation", "cp"]
    if python:
        if not re.fullmatch(r"3\.\d+", python):
            raise WheelhouseError(f"PY={python}: give a Python version as 3.12")
        options += ["--python-version", python]
    for tag in platform_tags(platform) if platform else []:
        options += ["--platform", tag]
    return options


def platform_tags(platform: str) -> list[str]:
    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not m:
        return [platform]
    glibc, arch = int(m[1]), m[2]
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(glibc, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    return tags + [f"{name}_{arch}" for minor, name in legacy.items() if minor <= glibc]


def resolve(requirements: list[str], links: Path, options: list[str], extra_index: list[str]) -> list[dict]:
    """What pip would install for ``requirements`` on the target (the install report's entries)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        target = ["--target", str(Path(tmp) / "target")] if options else []
        pip(
            "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
            "--find-links", str(links), *options, *target, *extra_index, *requirements,
        )  # fmt: skip
        return json.loads(report.read_text())["install"]


def pin(entry: dict) -> str:
    return f"{entry['metadata']['name']}=={entry['metadata']['version']}"


def build(args: argparse.Namespace) -> dict:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    project = metadata.version("parcae-pipeline")
    torch_spec = args.torch or f"torch=={metadata.version('torch').split('+')[0]}"
    extra_index = ["--extra-index-url", args.torch_index_url] if args.torch_index_url else []
    # 1. the wheels no index has (built here, pure Python)
    pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out), str(REPO))
    pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out),
        f"deepspeed=={metadata.version('deepspeed')}")  # fmt: skip
    extras = f"[{args.extras}]" if args.extras else ""
    requirements = [f"parcae-pipeline{extras}=={project}", torch_spec, *BUILD_TOOLS]
    options = target_options(args.python, args.platform)  # checked before the long steps
    entries = resolve(requirements, out, [], extra_index)
    sdists = [pin(e) for e in entries if not e["download_info"]["url"].endswith(".whl")]
    if sdists:
        pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), *sdists)
    # 2. the whole set for the target; 3. fetched, pinned
    if options:
        entries = resolve(requirements, out, options, extra_index)
    keep = [e for e in entries if args.torch or not TORCH_FAMILY.match(e["metadata"]["name"].lower())]
    pins = sorted(pin(e) for e in keep)
    (out / "requirements.txt").write_text("\n".join(pins) + "\n")
    pip(
        "download", "--quiet", "--no-deps", "--dest", str(out), "--find-links", str(out),
        *(options or ["--only-binary=:all:"]), *extra_index, "--requirement", str(out / "requirements.txt"),
    )  # fmt: skip
    summary = {
        "python": args.python or f"{sys.version_info.major}.{sys.version_info.minor}",
        "platform": args.platform or "this machine",
        "extras": args.extras,
        "torch": args.torch,
        "built_here": ["parcae-pipeline", "deepspeed", *sdists],
        "wheels": len(pins),
        "pins": pins,
    }
    (out / "wheelhouse.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
