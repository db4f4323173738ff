"""Run directories as numbers: one run's logged metrics, and runs grouped over train.seed.

Runs whose configs differ only in train.seed form one Group; a Stat is the mean over its seeds
with the min, max and standard deviation.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field

from modxla.analysis.flops import flops_per_step, forward_flops, param_count
from modxla.analysis.isoflop import budget_of, gaps, summarize
from modxla.config import Config, to_dict
from modxla.errors import UserError
from modxla.io import rundir

EMA = 0.9  # smoothing of the logged training loss in the curve panels
SPREAD = "error bars: min-max over seeds"


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
    def final_loss(self) -> float:
        """Last validation loss, else the mean of the last train losses."""
        if self.val:
            return self.val[-1]["val_loss"]
        tail = [r["lm_loss"] for r in self.train[-5:]]
        if not tail:
            raise MissingData(f"{rundir.basename(self.path)} has no logged losses")
        return sum(tail) / len(tail)

    def curve(self) -> dict[int, tuple[float, float, float]]:
        """step -> (cumulative FLOPs, cumulative wall-clock s, EMA-smoothed train loss)."""
        out, t, prev, ema = {}, 0.0, 0, 0.0
        for n, r in enumerate(self.train, 1):
            t += r["step_time_s"] * (r["step"] - prev)
            prev = r["step"]
            ema = EMA * ema + (1 - EMA) * r["lm_loss"]
            out[r["step"]] = (r["step"] * r["flops_per_step"], t, ema / (1 - EMA**n))  # debiased
        return out

    @property
    def steps_per_s(self) -> float:
        times = [r["step_time_s"] for r in self.train[len(self.train) // 4 :]]  # past compiles
        if not times:
            raise MissingData(f"{rundir.basename(self.path)} has no logged training steps")
        return 1.0 / statistics.median(times)


@dataclass
class Stat:
    mean: float
    lo: float
    hi: float
    std: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), min(values), max(values), std, len(values))

    @property
    def yerr(self) -> list[list[float]]:
        return [[self.mean - self.lo], [self.hi - self.mean]]


@dataclass
class Group:
    """Runs that differ only in train.seed."""

    runs: list[Run]
    budget: int = 0  # index of its training-FLOP budget among the groups (ascending)
    corpus: str = ""  # data.source's name, set when the runs use more than one corpus

    @property
    def cfg(self) -> Config:
        return self.runs[0].cfg

    @property
    def name(self) -> str:
        name = rundir.basename(self.runs[0].path)
        return re.sub(r"_s\d+$", "", name) if len(self.runs) > 1 else name

    @property
    def variant(self) -> str:
        mod = self.cfg.model.mod
        on = f" on {self.corpus}" if self.corpus else ""
        if self.cfg.model.moe_layers:
            return self._moe_variant() + on
        if not self.cfg.model.routed_layers:
            return "Baseline" + on
        name = f"MoD ({mod.capacity:.1%} capacity, every {mod.every})".replace(".0%", "%")
        if mod.router == "random":
            name = name.replace(", every", ", random routing, every")
        return name + on

    def _moe_variant(self, short: bool = False) -> str:
        """'MoE (4 experts, top-1, capacity factor 1.25, every 2)', 'Staged MoDE (12.5%
        capacity, ...)', 'Integrated MoDE (4 experts + 4 no-op, ...)', 'MoE (4 experts, expert
        choice, ...)'; short: 'MoE 4x1.25/2', 'MoE 4x1.25/2 EC'."""
        m = self.cfg.model
        moe, cap = m.moe, f"{m.mod.capacity:.1%}".replace(".0%", "%")
        expert_choice = moe.routing == "expert"  # another routing: another curve
        if short:
            name = f"{moe.experts}x{moe.capacity_factor:g}/{moe.every}"
            name += " EC" if expert_choice else ""
            if m.routed_layers:
                return f"Staged MoDE {cap} {name}"
            if moe.noop_experts:
                return f"Integrated MoDE {name}+{moe.noop_experts}"
            return f"MoE {name}"
        choice = "expert choice" if expert_choice else f"top-{moe.top_k}"
        tail = f"{choice}, capacity factor {moe.capacity_factor:g}, every {moe.every}"
        if m.routed_layers:
            return f"Staged MoDE ({cap} capacity, {moe.experts} experts, {tail})"
        if moe.noop_experts:
            return f"Integrated MoDE ({moe.experts} experts + {moe.noop_experts} no-op, {tail})"
        return f"MoE ({moe.experts} experts, {tail})"

    @property
    def short_variant(self) -> str:
        """'Baseline', 'MoD 12.5%/2', 'MoD 50%/2 random', 'MoE 4x1.25/2': for crowded tick
        labels."""
        mod = self.cfg.model.mod
        on = f" {self.corpus}" if self.corpus else ""
        if self.cfg.model.moe_layers:
            return self._moe_variant(short=True) + on
        if not self.cfg.model.routed_layers:
            return "Baseline" + on
        name = f"MoD {mod.capacity:.1%}/{mod.every}".replace(".0%", "%")
        return name + (" random" if mod.router == "random" else "") + on

    @property
    def is_baseline(self) -> bool:
        return not self.cfg.model.routed_layers and not self.cfg.model.moe_layers

    @property
    def params(self) -> int:
        return param_count(self.cfg.model)

    @property
    def fwd_flops(self) -> int:
        return forward_flops(self.cfg.model, self.cfg.data.seq_len)["total"]

    @property
    def flops_per_step(self) -> int:
        return flops_per_step(self.cfg)

    @property
    def total_flops(self) -> float:
        return float(self.cfg.train.steps * self.flops_per_step)

    @property
    def final_loss(self) -> Stat:
        return Stat.of([r.final_loss for r in self.runs])

    @property
    def steps_per_s(self) -> Stat:
        return Stat.of([r.steps_per_s for r in self.runs])

    def label(self, budgets: bool = False) -> str:
        seeds = f", {len(self.runs)} seeds" if len(self.runs) > 1 else ""
        at = f", {sci(self.total_flops)} FLOPs" if budgets else ""
        return f"{self.variant}, {self.params / 1e6:.2f}M{at}{seeds}"

    def curve(self):
        """Steps every seed logged: FLOPs, mean wall-clock, and the smoothed loss's Stat."""
        curves = [r.curve() for r in self.runs]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        flops = [curves[0][s][0] for s in steps]
        clock = [statistics.fmean(c[s][1] for c in curves) for s in steps]
        loss = [Stat.of([c[s][2] for c in curves]) for s in steps]
        return flops, clock, loss


# what a group may differ in besides train.seed: bookkeeping that does not change the run
IGNORED = {
    "train": ("seed", "compile_cache", "peak_flops"),
    "data": ("cache_dir", "num_proc"),
    "checkpoint": ("dir", "every", "keep", "async_save", "resume"),
}


def _seedless(cfg: Config) -> str:
    d = to_dict(cfg)
    for section, keys in IGNORED.items():
        for k in keys:
            d[section].pop(k)
    return json.dumps(d, sort_keys=True)


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs grouped by their config less train.seed and IGNORED keys, in first-seen order;
    budgets numbered."""
    by: dict[str, Group] = {}
    for r in runs:
        by.setdefault(_seedless(r.cfg), Group([])).runs.append(r)
    groups = list(by.values())
    for g, b in zip(groups, budget_of([g.total_flops for g in groups]), strict=True):
        g.budget = b
    if len({g.cfg.data.source for g in groups}) > 1:  # never fit one curve across corpora
        for g in groups:
            g.corpus = rundir.basename(g.cfg.data.source) or g.cfg.data.source
    return groups


def sci(x: float, _pos=None) -> str:
    """1.5e12 as '1.5e12', 0 as '0': tick labels with no offset text."""
    if x == 0:
        return "0"
    mant, exp = f"{x:.2g}".split("e") if "e" in f"{x:.2g}" else (f"{x:.2g}", "0")
    return mant if int(exp) == 0 else f"{mant}e{int(exp)}"


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


def runs_table(groups: list[Group]) -> str:
    """Markdown: one row per group, final validation loss as mean [min, max] over seeds."""
    rows = [
        "| run | params | steps | FLOPs/step | training FLOPs | seeds | val loss mean [min, max] "
        "| std | steps/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g in sorted(groups, key=lambda g: (g.budget, g.corpus, g.variant, g.params)):
        loss, sps = g.final_loss, g.steps_per_s
        rows.append(
            f"| {g.name} | {g.params:,} | {g.cfg.train.steps} | {sci(g.flops_per_step)} "
            f"| {sci(g.total_flops)} | {loss.n} | {loss.mean:.4f} [{loss.lo:.4f}, {loss.hi:.4f}] "
            f"| {loss.std:.4f} | {sps.mean:.1f} |"
        )
    return "\n".join(rows) + "\n"


def _budget_values(groups: list[Group]) -> dict[int, float]:
    """Budget index -> the median training FLOPs of its groups (the budget's name)."""
    totals: dict[int, list[float]] = {}
    for g in groups:
        totals.setdefault(g.budget, []).append(g.total_flops)
    return {b: statistics.median(v) for b, v in totals.items()}


def _points(groups: list[Group]) -> list[dict]:
    """One isoFLOP point per group: its budget, variant, size and final loss over seeds."""
    values = _budget_values(groups)
    points = []
    for g in groups:
        s = g.final_loss
        points.append(
            {
                "budget": values[g.budget],
                "variant": g.variant,
                "params": g.params,
                "loss": s.mean,
                "fwd_flops": g.fwd_flops,
                "loss_min": s.lo,
                "loss_max": s.hi,
                "loss_std": s.std,
                "seeds": s.n,
                "losses": [r.final_loss for r in g.runs],  # what the bootstrap resamples
                "run": g.name,
            }
        )
    return points


def gap_summary(groups: list[Group]) -> list[dict]:
    """isoflop_gaps.json: per budget, each variant's optimum loss minus the baseline's, with
    its bootstrap interval and the claim it allows (modxla.analysis.isoflop.gaps)."""
    return gaps(_points(groups))


def fit_summary(groups: list[Group]) -> list[dict]:
    """isoflop_fit.json: per (budget, variant) the fitted optimum with its bootstrap interval
    over seeds, plus the points it used, each with its residual from the parabola."""
    points = _points(groups)
    summary = summarize(points)
    keys = ("run", "params", "loss", "loss_min", "loss_max", "loss_std", "seeds", "losses")
    for e in summary:
        e["points"] = [
            {k: p[k] for k in keys}
            for p in sorted(points, key=lambda p: p["params"])
            if p["budget"] == e["budget_flops"] and p["variant"] == e["variant"]
        ]
        for p, r in zip(e["points"], e.get("optimum", {}).get("residuals", []), strict=False):
            p["residual"] = r  # seed mean - parabola (summarize's order: ascending params)
    return summary
