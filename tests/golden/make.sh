#!/usr/bin/env bash
# Regenerates the launcher golden files; review the diff before committing.
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${PYTHON:-.venv/bin/python}
G=(--commit 0123abcd --repo https://github.com/modxla/modxla.git --name mod --zone us-east5-a
   --project proj --dry-run --config configs/mod_c12_every2.yaml)
$py launch/tpu.py run "${G[@]}" --accelerator v5e-8 --run-dir runs/v5e8 mesh.fsdp=8 mesh.data=1 \
  > tests/golden/v5e_8_run.txt
$py launch/tpu.py up "${G[@]}" --spot --accelerator v5p-64 --run-dir gs://bucket/runs/v5p64 \
  mesh.fsdp=8 train.batch_size=32 > tests/golden/v5p_64_up.txt
MS=(--accelerator v5e-16 --slices 2 --run-dir gs://bucket/runs/ms mesh.dcn_data=2 mesh.fsdp=16
    train.batch_size=32)
$py launch/tpu.py up "${G[@]}" "${MS[@]}" > tests/golden/multislice_2x_v5e_16_up.txt
$py launch/tpu.py up "${G[@]}" --upload "${MS[@]}" \
  > tests/golden/multislice_2x_v5e_16_upload_up.txt
$py launch/tpu.py jobset "${G[@]}" --image us-docker.pkg.dev/p/r/modxla:deps "${MS[@]}" \
  > tests/golden/multislice_2x_v5e_16_jobset.yaml
