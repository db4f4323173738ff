#!/usr/bin/env bash
# The small-scale study behind docs/results.md: an isoFLOP sweep (baseline vs MoD 12.5% at
# three sizes), MoD 50% and MoD 50% random routing at the middle size, the predictor tool on
# the MoD runs, and the figures. Runs one after another on 1 XLA CPU device.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
export PJRT_DEVICE=CPU CPU_NUM_DEVICES=1
budget=${BUDGET:-2e12}
out=runs/study
common=(train.log_every=20 train.eval_every=250 train.eval_batches=8 data.val_fraction=0.02
        checkpoint.keep=1)
$py tools/isoflop.py --budget "$budget" --sizes 3x96 4x128 6x128 \
    --variants baseline mod_c12 mod_c50 mod_c50_random --out $out/configs --runs-dir $out
for name in baseline_3x96 baseline_4x128 baseline_6x128 mod_c12_3x96 mod_c12_4x128 \
            mod_c12_6x128 mod_c50_4x128 mod_c50_random_4x128; do
  $py -m modxla.train --config $out/configs/$name.yaml --run-dir $out/$name "${common[@]}"
done
for name in mod_c12_3x96 mod_c12_4x128 mod_c12_6x128; do
  $py tools/train_predictor.py --run-dir $out/$name --steps 300 --eval-batches 8
done
$py tools/plot.py --out docs/figures $out/baseline_* $out/mod_c12_* $out/mod_c50_4x128 \
    $out/mod_c50_random_4x128
