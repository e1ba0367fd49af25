#!/usr/bin/env bash
# `make setup`: this checkout's virtual environment, three ways (docs/gpu.md):
#   from the package index (default): torch pinned by TORCH_SPEC (TORCH_INDEX_URL: a CUDA wheel index), then the project;
#   over the site's own torch: TORCH_SPEC=system, a venv that sees $PYTHON's packages (a container's torch, or a
#     module's on PYTHONPATH); that torch is kept, never replaced;
#   from a wheelhouse (`make wheelhouse`): WHEELHOUSE=DIR, pip --no-index, no network.
# The Makefile passes its variables in the environment.
set -euo pipefail
PYTHON=${PYTHON:-python3} VENV=${VENV:-.venv} TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-} WHEELHOUSE=${WHEELHOUSE:-} EXTRAS=${EXTRAS-dev,parquet,hf}
LOWEST_TORCH=2.11  # pyproject.toml's lower bound

die() { echo "make setup: $*" >&2; exit 2; }

# --no-compile: pip would write the bytecode of every installed file, one file at a time (about 50 s on 2 cores,
# most of it for modules nothing imports); Python writes a module's bytecode when it is first imported instead
pip_opts=(--quiet --disable-pip-version-check --no-compile)
if [[ -n $WHEELHOUSE ]]; then
  [[ -f $WHEELHOUSE/wheelhouse.json ]] || die "WHEELHOUSE=$WHEELHOUSE: no wheelhouse.json there; make one with \
\`make wheelhouse WHEELHOUSE=$WHEELHOUSE\` on a machine that reaches the package index (docs/gpu.md)"
  pip_opts+=(--no-index --find-links "$WHEELHOUSE")
fi

if [[ $TORCH_SPEC == system ]]; then
  if [[ -x $VENV/bin/python ]] && ! grep -qi '^include-system-site-packages *= *true' "$VENV/pyvenv.cfg"; then
    die "TORCH_SPEC=system: $VENV was made without the site's packages; remove it (or set VENV=another) and run again"
  fi
  test -x "$VENV/bin/python" || "$PYTHON" -m venv --system-site-packages "$VENV"
  site_torch=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null) \
    || die "TORCH_SPEC=system: no torch importable by $PYTHON (PYTHONPATH=${PYTHONPATH:-}); load the site's PyTorch \
module or enter its container first, or set PYTHON= to the interpreter that has it"
  "$VENV/bin/python" - "$site_torch" "$LOWEST_TORCH" <<'EOF' || exit 2
import sys
seen, lowest = sys.argv[1], sys.argv[2]
numbers = lambda v: tuple(int(p) for p in v.split("+")[0].split(".")[:2])
if numbers(seen) < numbers(lowest):
    sys.exit(f"make setup: TORCH_SPEC=system: the site's torch is {seen}; this project needs torch>={lowest}")
EOF
  echo "set-up: keeping the site's torch $site_torch"
else
  test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
  if [[ -n $WHEELHOUSE ]] && ! compgen -G "$WHEELHOUSE/torch-*.whl" >/dev/null; then
    die "WHEELHOUSE=$WHEELHOUSE holds no torch wheel: use the site's torch (TORCH_SPEC=system), or make the \
wheelhouse with one (make wheelhouse WHEELHOUSE_TORCH='$TORCH_SPEC')"
  fi
  "$VENV/bin/pip" install "${pip_opts[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
fi

# Nothing below may replace that torch (an upgrade from the index would be a multi-GB CUDA build): pinned for pip
# and uv alike.
torch_version=${site_torch:-$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("torch"))')}
echo "torch==$torch_version" > "$VENV/torch-constraint.txt"
pip_opts+=(--constraint "$VENV/torch-constraint.txt")

"$VENV/bin/pip" install "${pip_opts[@]}" "setuptools>=64" wheel
# DeepSpeed builds from source against the torch above (no isolated build env that could pull another torch).
project=".${EXTRAS:+[$EXTRAS]}"
if [[ -z $WHEELHOUSE && $TORCH_SPEC != system ]]; then
  # From the package index: uv resolves as pip does, but downloads, builds and unpacks in parallel (16 s against
  # pip's 90 on 2 cores, docs/testing.md). uv does not read pip's configuration: the index pip is told to use
  # (PIP_INDEX_URL or pip.conf's index-url) is passed on.
  "$VENV/bin/pip" install "${pip_opts[@]}" "uv>=0.5"
  index=${PIP_INDEX_URL:-$("$VENV/bin/pip" config get global.index-url 2>/dev/null || true)}
  "$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python" --constraint "$VENV/torch-constraint.txt" \
    ${index:+--index-url "$index"} --no-build-isolation -e "$project"
else  # a wheelhouse (no network) or the site's torch: pip, which reads the site's pip configuration
  "$VENV/bin/pip" install "${pip_opts[@]}" --no-build-isolation -e "$project"
fi

modules=(torch deepspeed webdataset sentencepiece tensorboard pydantic boto3)
[[ ,$EXTRAS, == *,dev,* ]] && modules+=(moto xdist)
[[ ,$EXTRAS, == *,hf,* ]] && modules+=(transformers lm_eval)
[[ ,$EXTRAS, == *,parquet,* ]] && modules+=(pyarrow)
# The check writes the bytecode of what it imports (the first of what every command imports), even where
# PYTHONDONTWRITEBYTECODE is set; not with TORCH_SPEC=system, whose torch is the site's to write to or not.
write_bytecode=(env PYTHONDONTWRITEBYTECODE=)
[[ $TORCH_SPEC == system ]] && write_bytecode=()
"${write_bytecode[@]}" "$VENV/bin/python" -c "import $(IFS=,; echo "${modules[*]}"); print('set-up ok: torch', torch.__version__, 'deepspeed', \
deepspeed.__version__, '(${EXTRAS:-no extras})')"
