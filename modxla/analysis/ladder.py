"""Model ladders for isoFLOP sweeps: depth and width grown together by one aspect-ratio rule
(d_model = ASPECT x layers, heads of a fixed size), and the rungs one budget should sample.

The sweep before this mixed 2- and 3-layer models of any width, so neighbouring sizes differed
in shape as well as size (and, for MoD every 2, in the share of routed blocks) and the
parabolas came out bumpy. Along one ladder only the scale changes.

Which rungs a budget samples: a predicted optimum per variant (a power law in the budget,
OPTIMUM), the usable rung nearest to it, and `side` rungs on each side of it, extended to at
least `at_least` sizes. Usable: at least MIN_STEPS steps (the warmup and cosine need room) and
at most `max_tokens` tokens read (a run must never read a token twice: the loader wraps
silently), with tokens per parameter inside TPP. Where the ladder or those bounds cut a side
short, a warning says so and why: a fit with one size on a side is a bound, not an optimum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from modxla.analysis.flops import flops_per_step, param_count
from modxla.config import Config, ConfigError

# name -> (d_model per layer, head size). aspect16 is the study's: its rungs are 1.3-2x apart in
# parameters where this machine's budgets put the optima (4-10 layers); aspect32's are 1.6-2.7x.
LADDERS = {"aspect16": (16, 16), "aspect32": (32, 32)}
MIN_LAYERS = 2  # the fewest that route a block at every=2 (a 1-layer MoD model is the baseline)
MAX_LAYERS = 24
MIN_STEPS = 200
MAX_TOKENS = 15e6  # the whole standard library (31.5 M characters) holds ~16.7 M training tokens
TPP = (0.2, 200.0)  # tokens per parameter outside this: not a point worth a run

# Predicted optimum in parameters: N = N_1e12 * (budget / 1e12) ** exponent. Anchored at the
# study's fits at 1e12 (baseline 97.7 k, MoD 116 k parameters; 1e12 -> 2e12 gave exponents
# 0.58 and 0.57); MoD's steeper exponent follows the 1e13 probe, whose MoD optimum sat near
# 4x128 (0.93 M) while the baseline's best was its smallest size (0.71 M). Only a guess: the
# rungs on each side are what make the fit find the real one.
OPTIMUM = {"baseline": (98e3, 0.6), "mod_c12": (116e3, 0.75)}


@dataclass
class Rung:
    size: str  # LAYERSxD_MODEL
    params: int
    steps: int
    tokens: int  # read over the run: steps x batch x seq_len x grad_accum

    @property
    def tpp(self) -> float:
        return self.tokens / self.params


def ladder_sizes(name: str) -> tuple[list[str], int]:
    """Every rung of a ladder (ascending) and its head size."""
    if name not in LADDERS:
        raise ConfigError(f"ladder {name!r}: choose from {', '.join(LADDERS)}")
    aspect, head = LADDERS[name]
    return [f"{n}x{aspect * n}" for n in range(MIN_LAYERS, MAX_LAYERS + 1)], head


def rung(size: str, cfg: Config, budget: float) -> Rung:
    steps = round(budget / flops_per_step(cfg))
    per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
    return Rung(size, param_count(cfg.model), steps, steps * per_step)


def predicted_optimum(variant: str, budget: float) -> float:
    n, exponent = OPTIMUM.get(variant, OPTIMUM["baseline"])
    return n * (budget / 1e12) ** exponent


def why_not(r: Rung, max_tokens: float, min_steps: int = MIN_STEPS) -> str:
    """'' for a usable rung, else what rules it out."""
    if r.steps < min_steps:
        return f"{r.size} would train {r.steps} steps < {min_steps}"
    if r.tokens > max_tokens:
        return f"{r.size} would read {r.tokens / 1e6:.1f} M tokens > {max_tokens / 1e6:.1f} M"
    if not TPP[0] <= r.tpp <= TPP[1]:
        return f"{r.size} would see {r.tpp:.2g} tokens per parameter, outside {TPP}"
    return ""


def choose(
    rungs: list[Rung],
    target: float,
    side: int = 2,
    at_least: int = 6,
    max_tokens: float = MAX_TOKENS,
    min_steps: int = MIN_STEPS,
) -> tuple[list[Rung], list[str]]:
    """The rungs to sample around a predicted optimum of `target` parameters, and warnings.

    `rungs` ascending in parameters; the usable ones form one run (too many tokens below,
    too few steps above).
    """
    ok = [r for r in rungs if not why_not(r, max_tokens, min_steps)]
    if not ok:
        why = why_not(rungs[0], max_tokens, min_steps)
        raise ConfigError(f"no rung of the ladder is usable at this budget: {why}")
    c = min(range(len(ok)), key=lambda i: abs(math.log(ok[i].params / target)))
    lo, hi = max(0, c - side), min(len(ok) - 1, c + side)
    while hi - lo + 1 < at_least and (lo > 0 or hi < len(ok) - 1):
        # widen the side that has fewer rungs beyond the centre, else whichever can grow
        if lo > 0 and (c - lo <= hi - c or hi == len(ok) - 1):
            lo -= 1
        else:
            hi += 1
    warnings = []
    for n, edge, beyond in (
        (c - lo, "below", rungs.index(ok[0]) - 1),
        (hi - c, "above", rungs.index(ok[-1]) + 1),
    ):
        if n < side:
            limit = (
                why_not(rungs[beyond], max_tokens, min_steps)
                if 0 <= beyond < len(rungs)
                else "the ladder ends there"
            )
            warnings.append(
                f"{n} size(s) {edge} the predicted optimum {ok[c].size} "
                f"({target / 1e3:,.0f} k parameters): {limit}"
            )
    if hi - lo + 1 < at_least:
        warnings.append(f"only {hi - lo + 1} usable sizes (wanted {at_least})")
    return ok[lo : hi + 1], warnings


def choose_sizes(
    name: str,
    budget: float,
    variant: str,
    config_of: Callable[[str, int], Config],
    side: int = 2,
    at_least: int = 6,
    max_tokens: float = MAX_TOKENS,
    min_steps: int = MIN_STEPS,
) -> tuple[list[Rung], list[str]]:
    """A ladder's rungs for one variant at one budget; config_of(size, head) builds the run's
    config (the variant's and the sweep's overrides applied)."""
    sizes, head = ladder_sizes(name)
    rungs = [rung(s, config_of(s, head), budget) for s in sizes]
    target = predicted_optimum(variant, budget)
    return choose(rungs, target, side, at_least, max_tokens, min_steps)
