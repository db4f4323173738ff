#!/usr/bin/env bash
# The small-scale study behind docs/results.md, from scratch. Phases:
#   1. isoFLOP sweeps of the baseline and MoD 12.5% (every 2nd block) at two budgets, sizes on
#      both sides of each optimum; MoD 50% and MoD 50% random at one size (seed 0);
#   2. seeds 1 and 2 at each variant's optimum of the small budget and for the 4 variants;
#   3. the 4 variants, three seeds, on a second corpus (the system's manual pages);
#   4. (optional) seeds 1 and 2 at each variant's optimum of the large budget;
#   5. post hoc: the predictor over 3000 steps and its ablation, overflow and its calibration,
#      what the routed blocks do;
#   6. figures, run tables and isoFLOP fits (docs/figures), post-hoc reports (docs/study);
#   7. eager vs XLA:CPU step time at one of the study's sizes (docs/study).
# The ladder sweep (issue 25; optional, ~6 h two at a time: docs/results.md "Planned sweep"):
# baseline and MoD 12.5% every 2nd on one aspect-ratio ladder (LADDER, d_model = 16 x layers,
# 16-dim heads), each variant's sizes chosen by tools/isoflop.py --ladder around its predicted
# optimum, on the whole standard library:
#   8. 1e12 and 2e12, three seeds at every size;
#   9. 1e13, three seeds at every size;
#  10. 3e13, seed 0 at every size;
#  11. 3e13, seeds 1 and 2 at each variant's best size (seed 0) and its two neighbours;
#  12. figures and fits of the ladder runs (docs/figures/ladder).
#  15. the 4 variants at the 1e13 optimum size, three seeds, on both corpora (after 9).
# On a CUDA GPU (optional; its own phase, run alone: PHASES=14):
#  14. the GPU preset: baseline and MoD 12.5% at 1e14 and 3e14 on the aspect32 ladder, seed 0.
# MoDE (issue 26; optional, ~30 runs of 1-3 min):
#  13. at the large budget (2e12, phases 1-2's data), an isoFLOP comparison of baseline, MoE,
#      MoD 12.5%, staged and integrated MoDE, and MoE with its capacity cut to integrated
#      MoDE's compute (the token-dropping control) at 3 sizes (seed 0), seeds 1 and 2 at each
#      one's best size; figures (docs/figures/mode) and tables (docs/study/mode).
# Runs use eager PyTorch on the CPU (at these sizes ~2x faster than XLA:CPU, no compile), one
# thread each, JOBS at a time. Finished runs are skipped, so the script can be re-run after
# an interruption. PHASES selects steps, e.g. PHASES="1 2" bash docs/study.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=${OUT:-runs/study}
jobs=${JOBS:-2}
phases=${PHASES:-1 2 3 5 6 7}  # 4 and 8-13 are optional
small=${SMALL:-1e12}
large=${LARGE:-2e12}
# Ascending in parameters. At these budgets the optimum sits among the smallest models.
small_sizes=(2x32 2x48 2x64 2x96 3x96)
large_sizes=(2x48 2x64 2x96 3x96)
compare_size=3x96  # the 4-variant comparison (one routed block, as every 2-3 layer model here)
# MoDE (phase 13): the sizes around both 2e12 optima (2x64 for baseline and MoD 12.5%); the
# variants are tools/isoflop.py's (4 experts, top-1, capacity factor 1.25, every 2nd block)
mode_sizes=(2x48 2x64 2x96)
mode_variants=(baseline moe mod_c12 mode_staged mode_integrated moe_capacity)
export OMP_NUM_THREADS=1 PJRT_DEVICE=CPU CPU_NUM_DEVICES=1 py out
# The sizes' training FLOPs, and enough corpus (24 M characters) that no run sees a token twice.
base=(train.batch_size=16 data.max_chars=24000000)
export COMMON="train.device=cpu train.log_every=10 train.eval_every=100 train.eval_batches=16
  data.val_fraction=0.03 checkpoint.keep=1"
mkdir -p "$out"
ladder=${LADDER:-aspect16}
lroot=$out/ladder
# The whole standard library (31.5 M characters, ~16.7 M training tokens): the 3e13 rungs
# read up to 14 M tokens; tools/isoflop.py --ladder keeps every run under 15 M (none twice).
lbase=(train.batch_size=16 data.max_chars=0)

# Finished ladder runs keep their config and metrics (gzipped) under docs/study/finished, which is
# committed: the sweep spans sessions, and a fresh checkout restores them instead of re-running.
kept=${KEPT:-docs/study/finished}
groot=$out/gpu  # phase 14
export kept lroot groot

# One training run: CONFIG RUN_DIR SEED [overrides...]; skipped once it has finished.
train() {
  local cfg=$1 dir=$2 seed=$3 keep=""
  shift 3
  [ -e "$dir.done" ] && return 0
  case $dir in "$lroot"/* | "$groot"/*) keep=$kept/${dir#"$out"/} ;; esac
  local top=${keep#"$kept"/}
  top=$kept/${top%%/*}  # docs/study/finished/ladder: its runs' tokenizers
  mkdir -p "$(dirname "$dir")"
  if [ -n "$keep" ] && [ -e "$keep/metrics.jsonl.gz" ]; then
    mkdir -p "$dir" && cp "$keep/config.yaml" "$dir/" && gunzip -c "$keep/metrics.jsonl.gz" >"$dir/metrics.jsonl"
    touch "$dir.done"
    echo "kept   $dir"
    return 0
  fi
  mkdir "$dir.lock" 2>/dev/null || { echo "skip   $dir (running elsewhere)"; return 0; }
  trap 'rmdir "$dir.lock"' RETURN
  # a kept corpus's tokenizer goes where the run would train its own: retrained, it would
  # differ in its bytes (its trainer spec names a temporary file) even with the same pieces,
  # and on another machine its corpus (another interpreter's library) may differ too
  [ -z "$keep" ] || $py - "$top" "$cfg" "$@" <<'EOF'
import pathlib, shutil, sys
from modxla.config import load_config
from modxla.data.tokenizer import default_tokenizer_path
top, cfg = pathlib.Path(sys.argv[1]), load_config(sys.argv[2], sys.argv[3:])
name = cfg.data.source.replace("/", "_").replace(" ", "_")  # as the check below names it
kept_tok = top / f"tokenizer_{name}.model"
path = default_tokenizer_path(cfg.data, cfg.model.vocab_size)
if kept_tok.exists() and not cfg.data.tokenizer and not path.exists():
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(kept_tok, path)
EOF
  # shellcheck disable=SC2086
  if $py -m modxla.train --config "$cfg" --run-dir "$dir" train.seed="$seed" $COMMON "$@" \
      >"$dir.log" 2>&1; then
    if [ -n "$keep" ]; then
      # one tokenizer per corpus for every kept run, byte for byte: a run that trained another
      # (its cache already held one) would mix vocabularies into one curve
      local src tok
      src=$(grep -m1 '^  source:' "$dir/config.yaml" | sed 's/^  source: //; s#[/ ]#_#g')
      tok=$top/tokenizer_$src.model  # e.g. docs/study/finished/ladder/tokenizer_stdlib.model
      if [ -e "$tok" ] && ! cmp -s "$tok" "$dir/tokenizer.model"; then
        echo "FAILED $dir: its tokenizer differs from the kept runs' ($tok); not kept" >&2
        return 1
      fi
      [ -e "$tok" ] || cp "$dir/tokenizer.model" "$tok"
      mkdir -p "$keep" && cp "$dir/config.yaml" "$keep/" && gzip -9c "$dir/metrics.jsonl" >"$keep/metrics.jsonl.gz"
    fi
    touch "$dir.done"
    echo "done   $dir"
  else
    echo "FAILED $dir (log: $dir.log)" >&2
    return 1
  fi
}
export -f train

run_all() {  # lines of "CONFIG RUN_DIR SEED [overrides]" on stdin (no trailing blank: xargs -L
  # would join the next line), JOBS at a time
  xargs -P "$jobs" -L 1 bash -c 'train "$@"' _
}

plan() {  # BUDGET SIZES...: configs for every variant at every size (once: a re-run keeps them)
  local budget=$1
  shift
  [ -e "$out/configs/$budget/run_all.sh" ] && return 0
  $py tools/isoflop.py --budget "$budget" --sizes "$@" --out "$out/configs/$budget" \
    --variants baseline mod_c12 mod_c50 mod_c50_random --set "${base[@]}" >/dev/null
}

sweep() {  # BUDGET SEEDS SIZES...: baseline and MoD 12.5% at each size
  local budget=$1 seeds=$2
  shift 2
  for seed in $seeds; do
    for size in "$@"; do
      for v in baseline mod_c12; do
        echo "$out/configs/$budget/${v}_$size.yaml $out/$budget/${v}_${size}_s$seed $seed"
      done
    done
  done
}

compare() {  # BUDGET SEEDS DIR [overrides]: MoD 50% and MoD 50% random at compare_size
  local budget=$1 seeds=$2 dir=$3
  shift 3
  for seed in $seeds; do
    for v in mod_c50 mod_c50_random; do
      echo "$out/configs/$budget/${v}_$compare_size.yaml $dir/${v}_${compare_size}_s$seed $seed${*:+ $*}"
    done
  done
}

best_size() {  # BUDGET VARIANT SIZES...: the size with the lowest final validation loss (seed 0)
  $py - "$out/$1" "$2" "${@:3}" <<'EOF'
import json, pathlib, sys
root, variant, sizes = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
final = {}
for size in sizes:
    m = root / f"{variant}_{size}_s0" / "metrics.jsonl"
    vals = [json.loads(x)["val_loss"] for x in m.read_text().splitlines() if "val_loss" in x]
    final[size] = vals[-1]
print(min(final, key=final.get))
EOF
}

lplan() {  # BUDGET [ROOT LADDER OVERRIDES...]: each variant's rungs (once): configs,
  # plan.txt (with warnings), sizes.txt; by default the CPU ladder's
  local budget=$1 root=${2:-$lroot} lad=${3:-$ladder} over=("${@:4}")
  [ $# -gt 3 ] || over=("${lbase[@]}")
  local dir=$root/configs/$budget
  [ -e "$dir/sizes.txt" ] && return 0
  mkdir -p "$dir"
  $py tools/isoflop.py --budget "$budget" --ladder "$lad" --out "$dir" \
    --variants baseline mod_c12 --set "${over[@]}" >"$dir/plan.txt" 2>&1 ||
    { cat "$dir/plan.txt" >&2; return 1; }
  $py tools/isoflop.py --budget "$budget" --ladder "$lad" --print-sizes \
    --variants baseline mod_c12 --set "${over[@]}" >"$dir/sizes.txt.tmp"
  mv "$dir/sizes.txt.tmp" "$dir/sizes.txt"
}

lsweep() {  # BUDGET SEEDS [ROOT] < lines "VARIANT SIZE...": a training line per (variant, size, seed),
  # seed by seed: a sweep cut short has every variant at the seeds it reached
  local budget=$1 seeds=$2 root=${3:-$lroot} v sizes seed size
  local -a plan
  mapfile -t plan
  for seed in $seeds; do
    for line in "${plan[@]}"; do
      read -r v sizes <<<"$line"
      for size in $sizes; do
        echo "$root/configs/$budget/${v}_$size.yaml $root/$budget/${v}_${size}_s$seed $seed"
      done
    done
  done
}

finished() {  # RUN_DIR...: those that finished (a run in progress has no .done yet)
  local d
  for d in "$@"; do [ -e "$d.done" ] && echo "$d"; done
  return 0
}

lbest() {  # BUDGET: "VARIANT SIZE..." of each variant's best size (seed 0) and its neighbours
  $py - "$lroot/$1" "$lroot/configs/$1/sizes.txt" <<'EOF'
import json, pathlib, sys
root, plan = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for line in plan.read_text().splitlines():
    variant, *sizes = line.split()
    final = []
    for size in sizes:
        m = root / f"{variant}_{size}_s0" / "metrics.jsonl"
        vals = [json.loads(x)["val_loss"] for x in m.read_text().splitlines() if "val_loss" in x]
        final.append(vals[-1])
    i = min(range(len(sizes)), key=final.__getitem__)
    print(variant, *sizes[max(0, i - 1) : i + 2])
EOF
}

for p in $phases; do
  case $p in
  1)  # isoFLOP sweeps (seed 0) and the 4-variant comparison (seed 0)
    plan "$small" "${small_sizes[@]}"
    plan "$large" "${large_sizes[@]}"
    # the first run alone: it trains and caches the tokenizer the others share
    sweep "$small" 0 "$compare_size" | sed -n 1p | run_all
    { sweep "$small" 0 "${small_sizes[@]}"; compare "$small" 0 "$out/$small"
      sweep "$large" 0 "${large_sizes[@]}"; } | run_all
    ;;
  2)  # seeds 1 and 2: each variant's optimum of the small budget, and the 4-variant comparison
    { for v in baseline mod_c12; do
        sweep "$small" "1 2" $(best_size "$small" "$v" "${small_sizes[@]}") | grep "/${v}_"
      done
      sweep "$small" "1 2" "$compare_size"; compare "$small" "1 2" "$out/$small"; } | run_all
    ;;
  3)  # the 4-variant comparison on the manual pages, three seeds
    corpus=$out/corpus/manpages
    [ -e "$corpus.done" ] || { $py tools/prepare_corpus.py --out "$corpus" --max-chars 8000000 && touch "$corpus.done"; }
    man_runs() {
      for seed in 0 1 2; do
        for v in baseline mod_c12; do
          echo "$out/configs/$small/${v}_$compare_size.yaml $out/man/${v}_${compare_size}_s$seed $seed data.source=$corpus"
        done
      done
      compare "$small" "0 1 2" "$out/man" "data.source=$corpus"
    }
    man_runs | sed -n 1p | run_all  # alone: it trains the corpus's tokenizer
    man_runs | run_all
    ;;
  4)  # seeds 1 and 2 at each variant's optimum of the large budget
    { for v in baseline mod_c12; do
        sweep "$large" "1 2" $(best_size "$large" "$v" "${large_sizes[@]}") | grep "/${v}_"
      done; } | run_all
    ;;
  5)  # post hoc, on MoD 12.5% at the large budget's optimum (seed 0): the predictor over
      # 3000 steps and its ablation (each on a copy of the run), overflow and its
      # calibration, and what the routed blocks do
    P=$out/$large/mod_c12_$(best_size "$large" mod_c12 "${large_sizes[@]}")_s0
    export P
    mkdir -p "$out/predictor" "$out/routing"
    predictor() {  # NAME [tool options]: NAME "default" trains in the run itself
      local name=$1 dir=$P
      shift
      [ -e "$out/predictor/$name.done" ] && return 0
      if [ "$name" != default ]; then
        dir=$out/predictor/$name
        rm -rf "$dir" && cp -r "$P" "$dir" && rm -rf "$dir/predictor"
      fi
      $py tools/train_predictor.py --run-dir "$dir" --steps 3000 --eval-every 100 \
        --eval-batches 16 --init fresh "$@" >"$out/predictor/$name.log" 2>&1 &&
        touch "$out/predictor/$name.done" && echo "done   predictor $name"
    }
    export -f predictor
    printf '%s\n' default "hidden128 --hidden 128" "normed --input normed" \
      "balanced --pos-weight balanced" | xargs -P "$jobs" -L 1 bash -c 'predictor "$@"' _
    $py - "$out/predictor" "$P" >"$out/predictor/ablation.md" <<'EOF'
import json, pathlib, sys
root, run = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
print("| predictor | accuracy | always-skip | precision | recall | steps to 0.95 |")
print("|---|---|---|---|---|---|")
for name in ("default", "hidden128", "normed", "balanced"):
    d = run if name == "default" else root / name
    recs = [json.loads(x) for x in (d / "predictor" / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in recs if "val/predictor_acc" in r]
    last = ev[-1]
    first = next((r["step"] for r in ev if r["val/predictor_acc"] >= 0.95), None)
    print(f"| {name} | {last['val/predictor_acc']:.4f} | {last['val/always_skip_acc']:.4f} "
          f"| {last['val/precision']:.3f} | {last['val/recall']:.3f} | {first} |")
EOF
    $py tools/calibrate_routing.py --run-dir "$P" --json "$out/predictor/calibration.json" \
      >"$out/predictor/calibration.txt"
    $py tools/calibrate_routing.py --run-dir "$P" --search --dry-run \
      --json "$out/predictor/calibration_search.json" >"$out/predictor/calibration_search.txt"
    for r in "$P" "$out/$small"/mod_*_"$compare_size"_s?; do
      $py tools/inspect_routing.py --run-dir "$r" --batches 16 \
        --json "$out/routing/$(basename "$r").json" >"$out/routing/$(basename "$r").txt"
    done
    ;;
  6)  # figures and tables (docs/figures), and the post-hoc reports (docs/study/)
    # shellcheck disable=SC2046
    $py tools/plot.py --out docs/figures $(ls -d "$out/$small"/*_s? "$out/$large"/*_s?) \
      >docs/figures/plot.txt
    mkdir -p docs/figures/manpages
    # shellcheck disable=SC2046
    $py tools/plot.py --out docs/figures/manpages $(ls -d "$out"/man/*_s?) \
      >docs/figures/manpages/plot.txt
    mkdir -p docs/study
    cp "$out"/predictor/{ablation.md,calibration.txt,calibration_search.txt} docs/study/
    cp "$out"/routing/*.txt docs/study/
    ;;
  7)  # eager vs XLA:CPU step time at 3x96 (why the study runs eager)
    mkdir -p docs/study
    c=$out/configs/$small
    for backend in eager xla; do
      over=()
      [ $backend = eager ] && over=(train.device=cpu)
      $py tools/bench_step.py --baseline "$c/baseline_3x96.yaml" --mod "$c/mod_c12_3x96.yaml" \
        --steps 40 "${over[@]}" >"docs/study/step_3x96_$backend.json"
    done
    ;;
  8)  # the ladder at 1e12 and 2e12, three seeds at every size
    lplan 1e12 && lplan 2e12
    lsweep 1e12 0 <"$lroot/configs/1e12/sizes.txt" | sed -n 1p | run_all  # alone: tokenizer
    for b in 1e12 2e12; do lsweep "$b" "0 1 2" <"$lroot/configs/$b/sizes.txt"; done | run_all
    ;;
  9)  # the ladder at 1e13, three seeds at every size
    lplan 1e13
    lsweep 1e13 "0 1 2" <"$lroot/configs/1e13/sizes.txt" | run_all
    ;;
  10)  # the ladder at 3e13, seed 0 at every size
    lplan 3e13
    lsweep 3e13 0 <"$lroot/configs/3e13/sizes.txt" | run_all
    ;;
  11)  # 3e13: seeds 1 and 2 at each variant's best size and its two neighbours
    lbest 3e13 | lsweep 3e13 "1 2" | run_all
    ;;
  12)  # figures, run tables and fits (with intervals) of the ladder runs, and each plan
    mkdir -p docs/figures/ladder
    # shellcheck disable=SC2046
    $py tools/plot.py --out docs/figures/ladder $(finished "$lroot"/{1e12,2e12,1e13,3e13}/*_s?) \
      >docs/figures/ladder/plot.txt
    for b in 1e12 2e12 1e13 3e13; do
      [ -e "$lroot/configs/$b/plan.txt" ] && cp "$lroot/configs/$b/plan.txt" "docs/figures/ladder/plan_$b.txt"
    done
    ;;
  13)  # MoDE at the large budget: 6 variants x 3 sizes (the 6th, moe_capacity, is the
      # token-dropping control: MoE at integrated MoDE's expert compute), seeds at each best
      # size, then figures
    c=$out/configs/mode/$large
    m=$out/mode/$large
    if [ ! -e "$c/run_all.sh" ]; then
      mkdir -p "$c"
      $py tools/isoflop.py --budget "$large" --sizes "${mode_sizes[@]}" --out "$c" \
        --variants "${mode_variants[@]}" --set "${base[@]}" >"$c/plan.txt"
    fi
    mode_runs() {  # SEEDS VARIANT SIZES...
      local seeds=$1 v=$2 seed size
      shift 2
      for seed in $seeds; do
        for size in "$@"; do echo "$c/${v}_$size.yaml $m/${v}_${size}_s$seed $seed"; done
      done
    }
    mode_runs 0 baseline "${mode_sizes[0]}" | run_all  # alone: the tokenizer, if not cached
    for v in "${mode_variants[@]}"; do mode_runs 0 "$v" "${mode_sizes[@]}"; done | run_all
    for v in "${mode_variants[@]}"; do
      mode_runs "1 2" "$v" "$(best_size "mode/$large" "$v" "${mode_sizes[@]}")"
    done | run_all
    mkdir -p docs/figures/mode docs/study/mode
    # shellcheck disable=SC2046
    $py tools/plot.py --out docs/figures/mode $(ls -d "$m"/*_s?) >docs/study/mode/plot.txt
    mv docs/figures/mode/{runs.md,isoflop_fit.json} docs/study/mode/
    sed -i 's#figures/mode/\(runs.md\|isoflop_fit.json\)#study/mode/\1#' docs/study/mode/plot.txt
    cp "$c/plan.txt" docs/study/mode/plan.txt
    $py - "$m" "${mode_sizes[@]}" >docs/study/mode/loss.md <<'EOF'
import json, pathlib, statistics, sys
root, sizes = pathlib.Path(sys.argv[1]), sys.argv[2:]
variants = ["baseline", "moe", "mod_c12", "mode_staged", "mode_integrated", "moe_capacity"]
done = lambda name: (root / f"{name}.done").exists()  # finished runs only
print("Final validation loss at 2e12 FLOPs; mean [min, max] where there are 3 seeds\n")
print("| variant | " + " | ".join(sizes) + " |")
print("|---|" + "---|" * len(sizes))
for v in variants:
    cells = []
    for size in sizes:
        vals = []
        for m in sorted(root.glob(f"{v}_{size}_s?/metrics.jsonl")):
            if not done(m.parent.name):
                continue
            recs = [json.loads(x) for x in m.read_text().splitlines() if "val_loss" in x]
            vals.append(recs[-1]["val_loss"])
        if len(vals) > 1:
            cells.append(f"{statistics.fmean(vals):.3f} [{min(vals):.3f}, {max(vals):.3f}]")
        else:
            cells.append(f"{vals[0]:.3f}" if vals else "-")
    print(f"| {v} | " + " | ".join(cells) + " |")
print("\nMoE block, seed 0: fractions of the tokens it sees (staged: MoD's 8 of 64) taken by a")
print("real expert, dropped (its buffer full) and sent to a no-op expert; mean of the last 10")
print("logged training steps\n")
print("| run | routed | dropped | no-op |")
print("|---|---|---|---|")
for v in variants[1:]:
    for size in sizes:
        m = root / f"{v}_{size}_s0" / "metrics.jsonl"
        if v == "mod_c12" or not done(f"{v}_{size}_s0"):
            continue
        recs = [json.loads(x) for x in m.read_text().splitlines() if "moe_routed_frac" in x]
        cells = []
        for key in ("routed", "dropped", "noop"):
            vals = [x for r in recs[-10:] for k, x in r.items() if k.startswith(f"moe_{key}_")]
            cells.append(f"{statistics.fmean(vals):.3f}" if vals else "-")
        print(f"| {v}_{size} | " + " | ".join(cells) + " |")
EOF
    ;;
  15)  # the 4 variants (baseline, MoD 12.5%, 50%, 50% random) at the CMP_BUDGET (1e13)
      # optimum: the baseline's best rung there (seed mean, phase 9), three seeds, on the
      # standard library and on the manual pages; DRY=1 prints the runs instead
    b=${CMP_BUDGET:-1e13}
    size=$($py - "$lroot/$b" "$lroot/configs/$b/sizes.txt" <<'EOF'
import json, pathlib, statistics, sys
root, plan = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
lines = plan.read_text().splitlines()
sizes = next(line.split()[1:] for line in lines if line.startswith("baseline "))
mean = {}
for size in sizes:
    finals = []
    for m in sorted(root.glob(f"baseline_{size}_s?/metrics.jsonl")):
        if (m.parent.parent / f"{m.parent.name}.done").exists():
            recs = [json.loads(x) for x in m.read_text().splitlines() if "val_loss" in x]
            finals.append(recs[-1]["val_loss"])
    if finals:
        mean[size] = statistics.fmean(finals)
if not mean:
    sys.exit(f"no finished baseline run under {root}: run its ladder phase first")
print(min(mean, key=mean.get))
EOF
)
    c=$lroot/configs/compare_$b
    if [ ! -e "$c/run_all.sh" ]; then
      mkdir -p "$c"
      $py tools/isoflop.py --budget "$b" --sizes "$size" --out "$c" \
        --variants baseline mod_c12 mod_c50 mod_c50_random --set "${lbase[@]}" >"$c/plan.txt"
    fi
    corpus=$out/corpus/manpages
    [ -n "${DRY:-}" ] || [ -e "$corpus.done" ] ||
      { $py tools/prepare_corpus.py --out "$corpus" --max-chars 8000000 && touch "$corpus.done"; }
    cmp_runs() {
      for seed in 0 1 2; do
        for v in baseline mod_c12 mod_c50 mod_c50_random; do
          echo "$c/${v}_$size.yaml $lroot/compare_$b/${v}_${size}_s$seed $seed"
          echo "$c/${v}_$size.yaml $lroot/compare_${b}_man/${v}_${size}_s$seed $seed data.source=$corpus"
        done
      done
    }
    if [ -n "${DRY:-}" ]; then cmp_runs; else
      cmp_runs | run_all
      mkdir -p "docs/figures/ladder_compare_$b"
      # shellcheck disable=SC2046
      $py tools/plot.py --out "docs/figures/ladder_compare_$b" \
        $(finished "$lroot/compare_$b"/*_s? "$lroot/compare_${b}_man"/*_s?) \
        >"docs/figures/ladder_compare_$b/plot.txt"
    fi
    ;;
  14)  # the GPU preset: baseline and MoD 12.5% every 2nd block on the aspect32 ladder (5-11
      # layers: 2-5 routed blocks) at 1e14 and 3e14, seed 0, bf16 autocast on one CUDA GPU,
      # GPU_JOBS runs sharing it (eager steps this small are bound by kernel launches, not by
      # the GPU); figures and tables in docs/figures/gpu
    gdev=${GPU_DEVICE:-cuda}  # cpu: a smoke test of this phase at a tiny GPU_BUDGETS
    [ "$gdev" != cuda ] || $py -c "import torch, sys; sys.exit(not torch.cuda.is_available())" ||
      { echo "phase 14 needs a CUDA GPU (torch.cuda.is_available() is False)" >&2; exit 2; }
    read -ra gbase <<<"${GPU_SET:-train.batch_size=128 data.max_chars=0}"
    budgets=${GPU_BUDGETS:-1e14 3e14}
    start=$SECONDS
    for b in $budgets; do lplan "$b" "$groot" aspect32 "${gbase[@]}"; done
    (
      export COMMON="train.device=$gdev train.dtype=bfloat16 train.log_every=10
        train.eval_every=100 train.eval_batches=16 data.val_fraction=0.03 checkpoint.keep=1"
      jobs=${GPU_JOBS:-4}
      lsweep "${budgets%% *}" 0 "$groot" <"$groot/configs/${budgets%% *}/sizes.txt" | sed -n 1p |
        run_all  # alone: the tokenizer
      for b in $budgets; do lsweep "$b" 0 "$groot" <"$groot/configs/$b/sizes.txt"; done | run_all
    )
    echo "phase 14: $((SECONDS - start)) s of training"
    mkdir -p docs/figures/gpu
    # shellcheck disable=SC2046
    $py tools/plot.py --out docs/figures/gpu $(ls -d "$groot"/*/*_s?) >docs/figures/gpu/plot.txt
    for b in $budgets; do cp "$groot/configs/$b/plan.txt" "docs/figures/gpu/plan_$b.txt"; done
    $py -c "import sys, torch; print(torch.cuda.get_device_name() if sys.argv[1] == 'cuda' else 'cpu', \
      'torch', torch.__version__)" "$gdev" >docs/figures/gpu/device.txt
    ;;
  *)
    echo "phase $p: not in this script" >&2
    ;;
  esac
done
