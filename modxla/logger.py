"""Metrics sink: metrics.jsonl, TensorBoard and a progress bar, written from step closures."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm import tqdm


class MetricsLogger:
    def __init__(
        self, run_dir: Path, total_steps: int, initial: int, enabled: bool = True, desc="train"
    ):
        self.enabled = enabled
        self.file = None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.file = open(Path(run_dir) / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close)
        self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
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

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.tb.close()
            self.file.close()
