"""The paper's figures (PNG) from run directories.

    modxla-plot --out plots runs/base_s runs/mod_s [...]
    modxla-plot --out gs://bucket/plots gs://bucket/runs/base gs://bucket/runs/mod

Loss vs parameters per variant; loss vs FLOPs and wall-clock; FLOPs/step and steps/s bars;
normalized log-likelihood vs normalized FLOPs per forward pass (baseline, MoD top-k, MoD
predictor, to the best baseline); predictor top-k accuracy vs step; the isoFLOP fit (loss vs
parameters per training budget and variant, a parabola in log-parameters, its optimum), also
written as isoflop_fit.json and printed as a markdown table; per budget, each variant's
optimum loss minus the baseline's with a bootstrap interval over seeds and the claim it allows
(isoflop_gap.png, isoflop_gaps.json, a second table). A figure whose data the runs lack
(e.g. no baseline for the isoFLOP plot) is skipped with a note.

Runs whose configs differ only in train.seed (modxla-isoflop --seeds) are one group: figures
show the mean over seeds with min-max error bars or bands. Curves plot the training loss
smoothed by an exponential moving average over the logged steps.
"""

from __future__ import annotations

import json
import sys

from modxla.analysis.figures import render_all
from modxla.analysis.isoflop import gaps_markdown, markdown
from modxla.cli.common import parser
from modxla.errors import UserError, report
from modxla.io import rundir


def main(argv: list[str] | None = None) -> int:
    ap = parser("modxla-plot", __doc__)
    ap.add_argument("--out", required=True, help="output folder (path or URL) for the PNG files")
    ap.add_argument("runs", nargs="+", help="run directories (paths or URLs)")
    args = ap.parse_args(argv)
    try:
        written = render_all(args.runs, args.out, warn=lambda m: print(m, file=sys.stderr))
    except UserError as e:  # not a run directory (rundir.load_config says so)
        return report(e)
    for path in written.values():
        print(path)
    summary = json.loads(rundir.read_text(written["isoflop_fit.json"]))
    if summary:
        print(markdown(summary))
    claims = json.loads(rundir.read_text(written["isoflop_gaps.json"]))
    if claims:
        print("\n" + gaps_markdown(claims))
    return 0


if __name__ == "__main__":
    sys.exit(main())
