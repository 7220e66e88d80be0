#!/usr/bin/env bash
# One-shot GPU check: CUDA runs of the digits KD and GenDD presets, images/s and peak memory of the
# CIFAR resnet32x4 -> resnet8x4 KD and GenDD steps in fp32 / bf16 / bf16+compile, the CIFAR loader's
# images/s and the framework overhead on the GPU -> benchmarks/results/gpu/gpu_check.{md,json}
# (about 5 min on one GPU; what each section does: benchmarks/gpu_check.py).
# Without CUDA it prints one line on stderr and exits 2, before any work.
#
#   make install && bash benchmarks/gpu_check.sh     # a GPU machine that can install the project
#   bash benchmarks/gpu_check.sh --prepare-wheels    # on a machine with the registry: wheels of the pure-
#                                                    # Python dependencies a torch-only GPU image lacks
#   bash benchmarks/gpu_check.sh                     # there: torch's python3, src/ and those wheels
#
# Other arguments go to gpu_check.py (--quick, --budget-s, --sections ...). GENDD_PYTHON picks the
# interpreter (default: .venv/bin/python, else python3); GENDD_GPU_WHEELS the wheel folder.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WHEELS="${GENDD_GPU_WHEELS:-$ROOT/.cache/gendd/gpu_wheels}"
if [ -n "${GENDD_PYTHON:-}" ]; then
  PY="$GENDD_PYTHON"
elif [ -x .venv/bin/python ]; then
  PY="$ROOT/.venv/bin/python"
else
  PY=python3
fi

if [ "${1:-}" = "--prepare-wheels" ]; then
  # hydra-core, omegaconf, antlr4 at this environment's versions: pure Python, any 3.x interpreter
  version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
  mkdir -p "$WHEELS"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --implementation py --abi none --platform any \
    --python-version 3.12 -d "$WHEELS" "hydra-core==$(version hydra-core)" "omegaconf==$(version omegaconf)"
  "$PY" -m pip wheel -q --no-deps -w "$WHEELS" "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
  ls "$WHEELS"
  exit 0
fi

# found without importing anything (the check itself refuses before any work when there is no CUDA)
has() { "$PY" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))" "$@"; }
if has gendd_framework hydra omegaconf; then
  exec "$PY" benchmarks/gpu_check.py "$@"
fi

# A torch-only image: refuse first when there is no CUDA (one line, exit 2), then the source tree and
# the wheels of the pure-Python dependencies
"$PY" benchmarks/gpu_check.py --preflight "$@"
if ! has gendd_framework; then
  export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! has hydra omegaconf; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_check: $PY lacks hydra-core/omegaconf and $WHEELS has no wheels: run \`make install\`," \
      "or \`bash benchmarks/gpu_check.sh --prepare-wheels\` where the registry is reachable" >&2
    exit 2
  fi
  SITE="$(mktemp -d)"
  started=$(date +%s)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "gpu_check: installed $(ls "$WHEELS" | wc -l) wheels from $WHEELS in $(($(date +%s) - started)) s"
fi
exec "$PY" benchmarks/gpu_check.py "$@"
