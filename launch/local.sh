#!/usr/bin/env bash
# Simulate a TPU pod run on this machine: the pod's mesh scaled down to CPU virtual devices.
#   launch/local.sh --accelerator v5p-64 --config configs/tiny.yaml --run-dir runs/sim [k=v ...]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-$here/../.venv/bin/python}"
[ -x "$py" ] || py=python3
exec "$py" "$here/tpu.py" local "$@"
