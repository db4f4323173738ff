"""Per-device memory of a config's train step on a TPU slice, before paying for the slice.

    modxla-plan-memory --config configs/mod_3b.yaml --accelerator v5p-64 \\
        [mesh.fsdp=-1 mesh.data=1 train.remat=block optimizer.moment_dtype=bfloat16 ...]

Prints parameters, gradients, optimizer state (AdamW moments), activations and their total
per device for the mesh the config resolves to on that slice (mesh axes of -1 are filled from
the chip count), with the chip's HBM and whether the step fits. MoE expert weights are divided
over mesh.expert (and fsdp, tensor within an expert), the batch over data x fsdp x expert.
Parameters and gradients are float32; moments take optimizer.moment_dtype; activations follow
train.dtype and train.remat
(see modxla.analysis.memory_plan.activation_bytes). The estimate is checked against XLA's own buffer
assignment of the compiled step on CPU (tests/test_memory.py); leave headroom for XLA's
scratch buffers and collectives on TPU (about 10%).
"""

from __future__ import annotations

import json
import sys

from modxla.analysis.memory_plan import plan
from modxla.cli.common import parser
from modxla.config import load_config
from modxla.errors import UserError, report
from modxla.parallel.mesh import AXES
from modxla.parallel.tpus import GiB, parse_accelerator


def main(argv: list[str] | None = None) -> int:
    ap = parser("modxla-plan-memory", __doc__)
    ap.add_argument("--config", help="YAML experiment config (default: built-in defaults)")
    ap.add_argument(
        "--accelerator",
        required=True,
        help="TPU slice: v5p-N / v4-N (N TensorCores, 2 per chip), v5e-N / v6e-N (N chips)",
    )
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.remat=block")
    args = ap.parse_args(argv)
    try:
        acc = parse_accelerator(args.accelerator)
        kind, chips, hbm = acc.kind, acc.chips, acc.hbm_per_chip
        cfg = load_config(args.config, [*args.overrides, "train.compile_cache="])
        p = plan(cfg, chips, hbm)
    except UserError as e:
        return report(e)
    out = {
        "accelerator": args.accelerator,
        "chips": chips,
        "mesh": dict(zip(AXES, p.mesh, strict=True)),
        "remat": cfg.train.remat,
        "dtype": cfg.train.dtype,
        "moment_dtype": cfg.optimizer.moment_dtype,
        "params_total": p.params_total,
        "per_device_bytes": {
            "parameters": p.parameters,
            "gradients": p.gradients,
            "optimizer": p.optimizer,
            "activations": p.activations,
            "total": p.total,
        },
        "hbm_bytes": hbm,
        "fits": p.fits,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    m = out["mesh"]
    print(
        f"{args.accelerator}: {chips} chips of {kind} ({hbm / GiB:.0f} GiB HBM each), mesh "
        f"{' '.join(f'{axis}={n}' for axis, n in m.items())}; "
        f"{p.params_total / 1e9:.2f}B parameters; remat={cfg.train.remat}, "
        f"dtype={cfg.train.dtype}, moments={cfg.optimizer.moment_dtype}"
    )
    for name, value in out["per_device_bytes"].items():
        print(f"  {name:<12} {value / GiB:9.2f} GiB per device")
    verdict = "fits" if p.fits else "does NOT fit"
    print(f"  {verdict} in {hbm / GiB:.0f} GiB ({100 * p.total / hbm:.0f}% of HBM)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
