#!/usr/bin/env bash
# The accelerator check (benchmarks/device_check.py has the steps and the flags):
#   bash benchmarks/device_check.sh            # on a GPU, about 8 minutes; JSON to $OUT
#   bash benchmarks/device_check.sh --toy --out DIR   # every step at toy size, on CPU, under 3 minutes
# PYTHON picks the interpreter (default: python3); --toy runs on the default backend (JAX_PLATFORMS=cpu
# forces the CPU). WHEELS=DIR installs the wheels in DIR (packages the machine lacks, e.g. mujoco,
# mujoco-mjx, brax, ml_collections, gymnasium, rliable, evosax, arch) into a temp folder first.
# Writes nothing in the repository.
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
if [ -n "${WHEELS:-}" ]; then
  SITE="$(mktemp -d "${TMPDIR:-/tmp}/device_check_site.XXXXXX")"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl \
    || { echo "error: installing the wheels in $WHEELS failed" >&2; exit 2; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" "$HERE/device_check.py" "$@"
