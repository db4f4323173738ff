"""Train a MoD (or dense baseline) transformer.

    modxla-train --config configs/tiny.yaml --run-dir runs/x [key=value ...]
    python -m modxla.train ...   (the same; what pods run)

Reads the YAML config (configs/) with dotted overrides, and the data it names. Writes the run
directory: config.yaml, metrics.jsonl, tb/ (TensorBoard), tokenizer.model and
checkpoints/step_N; on a second start it resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import sys

from modxla.cli.common import parser
from modxla.config import load_config
from modxla.errors import EXIT_OK, EXIT_STOPPED, UserError, report
from modxla.train.trainer import train


def main(argv: list[str] | None = None) -> int:
    ap = parser(
        "modxla-train",
        __doc__,
        epilog="Exit status: 0 finished, 2 bad input, 3 diverged, 4 disk full (the checkpoints "
        "before are intact), 124 a step hung (stacks in <run-dir>/hangs/), 143 stopped by "
        "SIGTERM after saving its step; 124 and 143: run it again to resume. See "
        "modxla/errors.py.",
    )
    ap.add_argument("--config", help="YAML experiment config (see configs/)")
    ap.add_argument(
        "--run-dir",
        required=True,
        help="the run directory: a local path or a URL such as gs://bucket/runs/x (every host "
        "of a pod must see the same one)",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint, failing if there is none "
        "(without it, checkpoint.resume=auto resumes when one exists)",
    )
    ap.add_argument(
        "--allow-schedule-change",
        action="store_true",
        help="resume with another train.steps, learning rate, warmup or other optimisation "
        "setting (without it such a resume is refused; a changed model or data always is)",
    )
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    args = ap.parse_args(argv)
    try:
        overrides = [*args.overrides, *(["checkpoint.resume=must"] if args.resume else [])]
        if args.allow_schedule_change:
            overrides.append("checkpoint.allow_schedule_change=true")
        cfg = load_config(args.config, overrides)
        finished = train(cfg, args.run_dir)
    except UserError as e:
        return report(e)
    # a run stopped by a signal saved its step: the launcher and the JobSet restart it (resume)
    return EXIT_OK if finished else EXIT_STOPPED


if __name__ == "__main__":
    sys.exit(main())
