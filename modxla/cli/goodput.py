"""Goodput of a run: the share of its wall-clock spent on steps that count, badput by cause.

    modxla-goodput runs/x [--json]
    modxla-goodput gs://bucket/runs/x

Reads <run-dir>/goodput.jsonl, the timeline every start of modxla-train appends (one JSON
record per event: start, setup, first_step, step, save_start, save_end, end with its cause; see
modxla/analysis/goodput.py). Prints, over all attempts: the total wall-clock (each attempt from
its start to its end; the time between attempts is not counted), the goodput (productive step
time / wall-clock) and the badput by cause: setup (data, model build, resume), compile (the
first step of each attempt), checkpoint (saves), lost (steps done after the checkpoint the
next attempt resumed from, recomputed by it) and other (teardown, a hung step). --json prints
the whole summary, per attempt too, as one JSON object.
"""

from __future__ import annotations

import json
import sys

from modxla.analysis.goodput import GOODPUT, read_records, summarize
from modxla.cli.common import parser
from modxla.errors import UserError, report
from modxla.io import rundir


def main(argv: list[str] | None = None) -> int:
    ap = parser("modxla-goodput", __doc__)
    ap.add_argument("run_dir", help="the run directory (path or URL)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    try:
        path = rundir.join(args.run_dir, GOODPUT)
        records = read_records(path)
        if not records:
            raise UserError(f"{path}: no goodput records (not a modxla-train run directory?)")
    except UserError as e:
        return report(e)
    s = summarize(records)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"attempts: {len(s['attempts'])}")
    for a in s["attempts"]:
        print(
            f"  attempt {a['attempt']}: steps {a['resumed_at']}..{a['last_step']} "
            f"(last saved {a['last_saved']}), {a['wall_s']:.1f} s, {a['cause']}"
        )
    print(
        f"wall-clock: {s['wall_s']:.1f} s (time between attempts not counted: "
        f"{s['between_attempts_s']:.1f} s)"
    )
    print(
        f"goodput: {s['goodput']:.1%} ({s['productive_s']:.1f} s, "
        f"{s['productive_steps']} productive steps)"
    )
    print("badput:")
    for cause, share in s["badput"].items():
        extra = f", {s['lost_steps']} steps" if cause == "lost" else ""
        print(f"  {cause:<10} {share:6.1%} ({s['badput_s'][cause]:.1f} s{extra})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
