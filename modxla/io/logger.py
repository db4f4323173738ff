"""What a run tells its user: status lines (`say`), and the metrics sink (metrics.jsonl,
TensorBoard and a progress bar, written from step closures).

The files are staged through `modxla.io.rundir.Staging`: written in place for a local run
directory, kept locally and uploaded whole by `sync()` (at every checkpoint) and `close()` for
a URL such as gs://.
"""

from __future__ import annotations

import json
import math
import sys

from tqdm import tqdm

from modxla.io.rundir import Staging


def say(msg: str) -> None:
    """A progress or status line on stderr, `[modxla] ...`, that does not break tqdm bars."""
    tqdm.write(f"[modxla] {msg}", file=sys.stderr)


class MetricsLogger:
    def __init__(
        self, run_dir: str, total_steps: int, initial: int, enabled: bool = True, desc="train"
    ):
        """Logs into `run_dir` (a path or URL); records past step `initial` (left by a run
        that died after its last checkpoint) are dropped, since they will be logged again."""
        self.enabled = enabled
        self.file = None
        self.tb = None
        self.bar = None
        self.stage = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.stage = Staging(str(run_dir), keep_until=initial)
        self.file = open(self.stage.metrics, "a")  # noqa: SIM115 (closed in close)
        self.tb = SummaryWriter(self.stage.tb)
        self.bar = tqdm(
            total=total_steps,
            initial=initial,
            desc=desc,
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
        )

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        step = record["step"]
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        if "loss" in record:
            self.bar.set_postfix(
                loss=f"{record['loss']:.3f}",
                tok_s=f"{record.get('tokens_per_s', 0):.0f}",
                refresh=False,
            )
        self.bar.n = step
        self.bar.refresh()

    def sync(self) -> None:
        """Make the run directory hold everything logged so far (uploads for a URL)."""
        if not self.enabled:
            return
        self.file.flush()
        self.tb.flush()
        self.stage.sync()

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.tb.close()
            self.file.close()
            self.stage.close()
