"""The paper's figures from run directories (config.yaml + metrics.jsonl [+ predictor/]).

Run directories and the output folder are paths or URLs (gs://...), read and written through
modxla.rundir.
"""

from __future__ import annotations

import io
import json
import statistics
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from modxla import rundir  # noqa: E402
from modxla.config import Config  # noqa: E402
from modxla.errors import UserError  # noqa: E402
from modxla.metrics import forward_flops, param_count  # noqa: E402


class MissingData(UserError):
    """The runs lack what one figure needs (a baseline, logged steps): that figure is skipped."""


@dataclass
class Run:
    path: str  # a path or URL
    cfg: Config
    train: list[dict] = field(default_factory=list)  # records with a loss
    val: list[dict] = field(default_factory=list)  # records with a val_loss
    predictor: list[dict] = field(default_factory=list)
    routing_eval: dict | None = None

    @property
    def variant(self) -> str:
        mod = self.cfg.model.mod
        if not self.cfg.model.routed_layers:
            return "Baseline"
        name = f"MoD ({mod.capacity:.1%} capacity, every {mod.every})".replace(".0%", "%")
        return (
            name.replace(", every", ", random routing, every") if mod.router == "random" else name
        )

    @property
    def params(self) -> int:
        return param_count(self.cfg.model)

    @property
    def final_loss(self) -> float:
        """Last validation loss, else the mean of the last train losses."""
        if self.val:
            return self.val[-1]["val_loss"]
        tail = [r["lm_loss"] for r in self.train[-5:]]
        if not tail:
            raise MissingData(f"{self.path.name} has no logged losses")
        return sum(tail) / len(tail)

    def curve(self) -> tuple[list[float], list[float], list[float]]:
        """(cumulative FLOPs, cumulative wall-clock s, train loss) at each logged step."""
        flops, clock, loss = [], [], []
        t, prev = 0.0, 0
        for r in self.train:
            t += r["step_time_s"] * (r["step"] - prev)
            prev = r["step"]
            flops.append(r["step"] * r["flops_per_step"])
            clock.append(t)
            loss.append(r["lm_loss"])
        return flops, clock, loss

    @property
    def steps_per_s(self) -> float:
        times = [r["step_time_s"] for r in self.train[len(self.train) // 4 :]]  # past compiles
        if not times:
            raise MissingData(f"{self.path.name} has no logged training steps")
        return 1.0 / statistics.median(times)


def load_runs(paths) -> list[Run]:
    runs = []
    for p in map(str, paths):
        recs = rundir.read_jsonl(rundir.join(p, rundir.METRICS))
        ev = rundir.join(p, rundir.PREDICTOR, rundir.EVAL)
        runs.append(
            Run(
                path=p,
                cfg=rundir.load_config(p),
                train=[r for r in recs if "loss" in r],
                val=[r for r in recs if "val_loss" in r],
                predictor=rundir.read_jsonl(rundir.join(p, rundir.PREDICTOR, rundir.METRICS)),
                routing_eval=json.loads(rundir.read_text(ev)) if rundir.exists(ev) else None,
            )
        )
    return runs


def _save(fig, out: str, name: str) -> str:
    path = rundir.join(out, f"{name}.png")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    rundir.write_bytes(path, buf.getvalue())
    return path


def loss_vs_params(runs: list[Run]):
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for variant in sorted({r.variant for r in runs}):
        pts = sorted((r.params, r.final_loss) for r in runs if r.variant == variant)
        ax.plot(*zip(*pts, strict=True), "o--", label=variant)
    ax.set_xscale("log")
    ax.set_xlabel("Parameters")
    ax.set_ylabel("Loss")
    ax.legend(fontsize=7)
    return fig


def loss_vs_flops_and_clock(runs: list[Run]):
    fig, (a, b) = plt.subplots(2, 1, figsize=(5.5, 6))
    for r in runs:
        flops, clock, loss = r.curve()
        label = f"{r.variant}, {r.params / 1e6:.2f}M"
        style = "-" if r.variant == "Baseline" else "--"
        a.plot([f / 1e18 for f in flops], loss, style, label=label)
        b.plot(clock, loss, style, label=label)
    a.set_xlabel("FLOPs (*1e18)")
    b.set_xlabel("Wall-clock (s)")
    for ax in (a, b):
        ax.set_ylabel("Loss")
        ax.legend(fontsize=6)
    return fig


def throughput_bars(runs: list[Run]):
    fig, (a, b) = plt.subplots(2, 1, figsize=(5.5, 6))
    names = [f"{r.variant}\n{r.params / 1e6:.2f}M" for r in runs]
    a.bar(names, [r.train[-1]["flops_per_step"] / 1e14 for r in runs])
    a.set_ylabel("FLOPs/step (*10^14)")
    b.bar(names, [r.steps_per_s for r in runs])
    b.set_ylabel("Steps/s")
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=6)
    return fig


def isoflop_ll(runs: list[Run]):
    """Normalized LL vs normalized FLOPs per forward pass, to the best (lowest-loss) baseline."""
    base = [r for r in runs if r.variant == "Baseline"]
    if not base:
        raise MissingData("needs at least one baseline run")
    ref = min(base, key=lambda r: r.final_loss)
    ref_flops = forward_flops(ref.cfg.model, ref.cfg.data.seq_len)["total"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    series: dict[str, list] = {"Baseline": []}
    for r in runs:
        x = forward_flops(r.cfg.model, r.cfg.data.seq_len)["total"] / ref_flops
        y = r.final_loss / ref.final_loss
        if r.variant == "Baseline":
            series["Baseline"].append((x, y))
            continue
        if r.cfg.model.mod.router != "learned":
            continue  # random routing has no top-k vs predictor story to tell
        cap = f"{r.cfg.model.mod.capacity:.1%}".replace(".0%", "%")
        series.setdefault(f"MoD ({cap}) using top-k", []).append((x, y))
        if r.routing_eval:
            ratio = r.routing_eval["predictor"]["nll"] / r.routing_eval["topk"]["nll"]
            series.setdefault(f"MoD ({cap}) using predictor", []).append((x, y * ratio))
    for name, pts in series.items():
        if pts:
            ax.plot(*zip(*sorted(pts), strict=True), "o--", label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("Normalized FLOPs per FFW pass (to the isoFLOP-optimal baseline)")
    ax.set_ylabel("Normalized log-likelihood")
    ax.legend(fontsize=7)
    return fig


def predictor_accuracy(runs: list[Run]):
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in runs:
        if r.predictor:
            pts = [(x["step"], x["predictor_acc/mean"]) for x in r.predictor]
            ax.plot(*zip(*pts, strict=True), label=f"{rundir.basename(r.path)} (post hoc)")
        keys = [k for k in (r.train[-1] if r.train else {}) if k.startswith("predictor_acc/")]
        if keys:
            acc = [sum(x[k] for k in keys) / len(keys) for x in r.train]
            ax.plot([x["step"] for x in r.train], acc, label=f"{rundir.basename(r.path)} (joint)")
        if r.cfg.model.routed_layers:
            ax.axhline(1 - r.cfg.model.mod.capacity, ls=":", color="gray")
    ax.set_xlabel("Training step")
    ax.set_ylabel("Top-k prediction accuracy")
    ax.legend(fontsize=7)
    return fig


FIGURES = {
    "loss_vs_params": loss_vs_params,
    "loss_vs_flops_wallclock": loss_vs_flops_and_clock,
    "flops_and_steps_per_s": throughput_bars,
    "isoflop_loglikelihood": isoflop_ll,
    "predictor_accuracy": predictor_accuracy,
}


def render_all(run_dirs, out: str, warn=print) -> dict[str, str]:
    """Every figure the runs have data for, as PNG files in `out`."""
    runs = load_runs(run_dirs)
    runs = [r for r in runs if r.train] or runs
    out = str(out)
    rundir.makedirs(out)
    written = {}
    for name, fn in FIGURES.items():
        try:
            written[name] = _save(fn(runs), out, name)
        except MissingData as e:  # anything else is a bug and keeps its traceback
            warn(f"skipped {name}: {e}")
            plt.close("all")
    return written
