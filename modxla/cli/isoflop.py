"""isoFLOP sweeps: the training steps each (size, variant) needs to spend one FLOP budget.

    modxla-isoflop --budget 2e15 --sizes 2x64 4x128 6x192 --out sweeps/iso2e15 \\
        [--base configs/tiny.yaml] [--variants baseline mod_c12 mod_c50 mod_c50_random \\
        moe mode_staged mode_integrated moe_capacity] \\
        [--seeds 0 1 2] [--set train.device=cpu data.source=corpus/man]

Sizes are LAYERSxD_MODEL (head size --head-dim, 32 by default). --ladder NAME chooses them
instead: each variant's own rungs of one aspect-ratio ladder (modxla.analysis.ladder) around
its predicted optimum at this budget, two each side, at least six, each within 200 steps and
--max-tokens; --print-sizes prints the choice ("VARIANT SIZE...") and writes nothing:

    modxla-isoflop --budget 1e13 --ladder aspect16 --print-sizes --set train.batch_size=16
 Steps come from the analytic FLOPs per step
(modxla.analysis.flops); a run whose whole steps cannot land within 2% of the budget is refused.
Writes one ready-to-run config per run and run_all.sh with the commands.

--seeds: one run per seed, named VARIANT_SIZE_sN when more than one seed is given (one seed
keeps the name VARIANT_SIZE). A seed sets train.seed (weights, random routing); data.seed stays
the base config's, because it also picks the validation documents: every run of a sweep is
evaluated on the same held-out text and sees the same batch order. --seed-data sets data.seed
too (another batch order and another validation split per seed: a wider, noisier spread).
--set: overrides applied to every config before the steps are computed (so a different
data.seq_len or train.batch_size is budgeted for); train.steps and train.seed are the sweep's.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from modxla.analysis import ladder
from modxla.analysis.flops import flops_per_step, param_count
from modxla.cli.common import parser
from modxla.config import Config, ConfigError, load_config, save_config
from modxla.errors import UserError, report

VARIANTS = {
    "baseline": ["model.mod.capacity=1.0"],
    "mod_c12": ["model.mod.capacity=0.125", "model.mod.every=2", "model.mod.router=learned"],
    "mod_c50": ["model.mod.capacity=0.5", "model.mod.every=2", "model.mod.router=learned"],
    "mod_c50_random": [
        "model.mod.capacity=0.5",
        "model.mod.every=2",
        "model.mod.router=random",
        "model.mod.aux_loss_weight=0",
    ],
}
# MoE and MoDE (docs/study.sh phase 13). At the study's scale (d 48-96, T 64, batch 16, 2-3
# layers) an MoE layer is Switch-like and small: 4 experts, top-1, capacity factor 1.25 (20 of
# the 64 tokens' slots per expert: a little slack over 16, so few tokens drop), in every 2nd
# block as MoD routes every 2nd, so staged MoDE's MoD and MoE blocks coincide. More experts
# would leave each a handful of slots per 64-token sequence; top-2 doubles the MoE's FLOPs.
_MOE = [
    "model.mod.capacity=1.0",
    "model.moe.experts=4",
    "model.moe.every=2",
    "model.moe.top_k=1",
    "model.moe.capacity_factor=1.25",
]
_NOOP = 4  # integrated MoDE's no-op experts: as many as real ones
VARIANTS.update(
    {
        "moe": _MOE,
        # MoD 12.5% every 2nd around the MoE block: its MoE sees the k = 8 routed tokens
        # (2 slots per expert, rounded from 2.5).
        "mode_staged": [*_MOE, *VARIANTS["mod_c12"]],
        # The MoE router also picks among 4 no-op experts: C = round(1.25 * 64 / 8) = 10 slots
        # per real expert, half the MoE's 20; a token sent to a no-op keeps its residual.
        "mode_integrated": [*_MOE, f"model.moe.noop_experts={_NOOP}"],
        # The paper's token-dropping control: the MoE with its capacity factor cut to 1.25 *
        # 4 / (4 + 4) = 0.625, so its experts have integrated MoDE's 10 slots each (the same
        # expert FLOPs; only the router, 4 outputs instead of 8, is a little cheaper).
        "moe_capacity": [*_MOE, f"model.moe.capacity_factor={1.25 * 4 / (4 + _NOOP)}"],
    }
)
TOLERANCE = 0.02


def size_overrides(size: str, head_dim: int = 32) -> list[str]:
    try:
        layers, d = (int(x) for x in size.lower().split("x"))
    except ValueError:
        raise ConfigError(f"size {size!r}: expected LAYERSxD_MODEL, e.g. 4x128") from None
    return [
        f"model.num_layers={layers}",
        f"model.d_model={d}",
        f"model.num_heads={max(1, d // head_dim)}",
    ]


def budget_name(budget: float) -> str:
    """3e14 for 3e+14: the budget's folder under --runs-dir."""
    return f"{budget:.3g}".replace("e+", "e")


SWEEP_KEYS = ("train.steps", "train.seed")  # set by the sweep itself, never by --set


def check_extra(extra: list[str], seed_data: bool = False) -> None:
    owned = (*SWEEP_KEYS, "data.seed") if seed_data else SWEEP_KEYS
    for text in extra:
        if text.split("=", 1)[0].strip() in owned:
            raise ConfigError(f"--set {text}: the sweep sets {' and '.join(owned)} itself")


def ladder_plan(
    base: str,
    budget: float,
    ladder_name: str,
    variants: list[str],
    extra: list[str] = (),
    side: int = 2,
    max_tokens: float = ladder.MAX_TOKENS,
    min_steps: int = ladder.MIN_STEPS,
) -> tuple[dict[str, list[ladder.Rung]], list[str], int]:
    """Each variant's rungs of a ladder at one budget, warnings (prefixed by the variant), and
    the ladder's head size."""
    check_extra(extra)
    chosen, warnings = {}, []
    for variant in variants:
        if variant not in VARIANTS:
            raise ConfigError(f"variant {variant!r}: choose from {', '.join(VARIANTS)}")

        def config_of(size: str, head: int, v: str = variant) -> Config:
            return load_config(base, [*size_overrides(size, head), *VARIANTS[v], *extra])

        rungs, warn = ladder.choose_sizes(
            ladder_name,
            budget,
            variant,
            config_of,
            side,
            max_tokens=max_tokens,
            min_steps=min_steps,
        )
        chosen[variant] = rungs
        warnings += [f"{variant}: {w}" for w in warn]
    return chosen, warnings, ladder.LADDERS[ladder_name][1]


def plan(
    base: str,
    budget: float,
    sizes: list[str] | dict[str, list[str]],
    variants: list[str],
    seeds: list[int] = (0,),
    extra: list[str] = (),
    seed_data: bool = False,
    head_dim: int = 32,
) -> list[dict]:
    """One entry per run: name, overrides, config, steps, the FLOPs it will spend, its seed.

    sizes: one list for every variant, or each variant's own (a ladder's choice)."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {list(seeds)}: give one or more distinct seeds")
    check_extra(extra, seed_data)
    runs = []
    for variant in variants:
        if variant not in VARIANTS:
            raise ConfigError(f"variant {variant!r}: choose from {', '.join(VARIANTS)}")
        for size in sizes[variant] if isinstance(sizes, dict) else sizes:
            over = [*size_overrides(size, head_dim), *VARIANTS[variant], *extra]
            cfg: Config = load_config(base, over)
            per_step = flops_per_step(cfg)
            steps = round(budget / per_step)
            spent = steps * per_step
            if steps < 1 or abs(spent - budget) > TOLERANCE * budget:
                raise ConfigError(
                    f"{variant} {size}: {per_step:.3g} FLOPs/step cannot spend {budget:.3g} "
                    f"within {TOLERANCE:.0%} (nearest: {steps} steps); raise the budget"
                )
            over.append(f"train.steps={steps}")
            for seed in seeds:
                name = f"{variant}_{size}" + (f"_s{seed}" if len(seeds) > 1 else "")
                seeded = [*over, f"train.seed={seed}"]
                if seed_data:
                    seeded.append(f"data.seed={seed}")
                runs.append(
                    {
                        "name": name,
                        "overrides": seeded,
                        "config": load_config(base, seeded),
                        "steps": steps,
                        "flops": spent,
                        "params": param_count(cfg.model),
                        "seed": seed,
                    }
                )
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = parser("modxla-isoflop", __doc__)
    ap.add_argument("--budget", type=float, required=True, help="training FLOPs per run")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--sizes", nargs="+", help="LAYERSxD_MODEL, e.g. 4x128")
    which.add_argument(
        "--ladder",
        choices=sorted(ladder.LADDERS),
        help="choose each variant's sizes from this ladder for the budget (d_model = 16 or 32 "
        "x layers, heads of 16 or 32)",
    )
    ap.add_argument("--head-dim", type=int, default=32, help="head size of --sizes (default 32)")
    ap.add_argument(
        "--side", type=int, default=2, help="--ladder: sizes each side of the predicted optimum"
    )
    ap.add_argument(
        "--max-tokens",
        type=float,
        default=ladder.MAX_TOKENS,
        help="--ladder: most tokens a run may read (the corpus's training tokens: none twice)",
    )
    ap.add_argument(
        "--print-sizes",
        action="store_true",
        help="--ladder: print 'VARIANT SIZE...' per variant and write nothing",
    )
    ap.add_argument("--variants", nargs="+", default=["baseline", "mod_c12"])
    ap.add_argument("--base", default="configs/tiny.yaml", help="config the sizes modify")
    ap.add_argument("--out", help="folder for the configs and run_all.sh")
    ap.add_argument(
        "--runs-dir",
        default="runs/isoflop",
        help="where run_all.sh trains: one folder per budget below it (runs/isoflop/3e14/...), "
        "so two budgets never share a run directory",
    )
    ap.add_argument(
        "--seeds", nargs="+", type=int, default=[0], help="train.seed of each run (default: 0)"
    )
    ap.add_argument(
        "--seed-data",
        action="store_true",
        help="set data.seed to the seed too (batch order and validation split vary)",
    )
    ap.add_argument(
        "--set",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        dest="extra",
        help="config overrides for every run, e.g. train.device=cpu data.source=corpus/man",
    )
    args = ap.parse_args(argv)
    if not args.out and not args.print_sizes:
        ap.error("--out is required (unless --ladder ... --print-sizes)")
    if args.print_sizes and not args.ladder:
        ap.error("--print-sizes needs --ladder")
    try:
        sizes, head = args.sizes, args.head_dim
        if args.ladder:
            chosen, warnings, head = ladder_plan(
                args.base,
                args.budget,
                args.ladder,
                args.variants,
                args.extra,
                args.side,
                args.max_tokens,
            )
            for w in warnings:
                print(f"warning: {w}", file=sys.stderr)
            sizes = {v: [r.size for r in rungs] for v, rungs in chosen.items()}
            if args.print_sizes:
                for v, names in sizes.items():
                    print(v, *names)
                return 0
            for v, rungs in chosen.items():
                for r in rungs:
                    print(
                        f"{v} {r.size}: params {r.params:,}  steps {r.steps}  "
                        f"tokens {r.tokens / 1e6:.2f} M  tokens/param {r.tpp:.2g}"
                    )
        runs = plan(
            args.base,
            args.budget,
            sizes,
            args.variants,
            args.seeds,
            args.extra,
            args.seed_data,
            head,
        )
    except UserError as e:
        return report(e)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["#!/usr/bin/env bash", "set -euo pipefail"]
    for r in runs:
        path = out / f"{r['name']}.yaml"
        save_config(r["config"], path)
        cmd = [
            "python",
            "-m",
            "modxla.train",
            "--config",
            str(path),
            "--run-dir",
            f"{args.runs_dir}/{budget_name(args.budget)}/{r['name']}",
        ]
        lines.append(shlex.join(cmd))
        print(
            f"{r['name']:<28} params {r['params']:>10,}  steps {r['steps']:>6}  "
            f"FLOPs {r['flops']:.4g} ({r['flops'] / args.budget - 1:+.2%})"
        )
    (out / "run_all.sh").write_text("\n".join(lines) + "\n")
    print(f"wrote {len(runs)} configs and {out / 'run_all.sh'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
