#!/usr/bin/env bash
# The GPU check in one go (issue 19): the GPU tests, then eval/benchmarks/bench_gpu.py, in under 8 minutes, writing
# eval/results/bench_gpu.{json,md} that name the device. For a machine with one CUDA GPU, no network and
# its own torch: nothing is installed, the project runs from this checkout on that torch.
#
#   eval/benchmarks/gpu_check.sh [--wheels DIR] [--budget-s 450] [--out eval/results]
#   eval/benchmarks/gpu_check.sh --dry-run [--out DIR]      # on a CPU: every step but CUDA's, tiny sizes
#
# --wheels DIR: pure-Python packages the machine lacks, installed into a temp folder for this run only
# (pip --no-index --no-deps); torch and its CUDA/Triton wheels are refused. $PYTHON picks the interpreter
# (default python3: on the GPU machine, the one that holds its torch).
set -euo pipefail
cd "$(dirname "$0")/../.."
py="${PYTHON:-python3}"
wheels=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels="${2:?--wheels needs a folder}"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ -n "$wheels" ]; then
  shopt -s nullglob
  files=("$wheels"/*.whl)
  [ ${#files[@]} -gt 0 ] || { echo "error: no .whl files in --wheels $wheels" >&2; exit 2; }
  for f in "${files[@]}"; do
    case "$(basename "$f" | tr 'A-Z' 'a-z')" in
      torch-*|torch_*|triton-*|nvidia_*|nvidia-*)
        echo "error: $(basename "$f"): the check runs on the machine's own torch; carry pure-Python packages only" >&2
        exit 2 ;;
    esac
  done
  site="$(mktemp -d)"
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" "${files[@]}"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$py" eval/benchmarks/gpu_check.py ${args[@]+"${args[@]}"}
