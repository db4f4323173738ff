"""Analytic FLOPs per step (the paper's FLOPs/step chart), MFU and throughput helpers.

A matmul of (m, n) by (n, p) counts 2*m*n*p FLOPs. Dense blocks process all T tokens, routed
blocks k = round(C*T); attention scores and values add their own quadratic term over the
tokens a block processes (the full square is counted, as it is computed). The input embedding
is a gather (0 FLOPs); the output head counts 2*T*D*V. Backward counts twice the forward,
except where no input gradient exists: the predictor runs on stop_gradient(x) (its backward is
the weight gradients and fc2's input gradient, 2*T*(D*H + 2H)). Random routing's router
(Gaussian weights on detached x, no backward) is not counted.

An MoE layer (model.moe) counts its experts at capacity: E buffers of C slots each run the
MLP whether full or not (empty slots are computed too), plus its router 2*n*D*(E + N) over
the n tokens its MLP sees (T, or MoD's k in a staged MoDE block). No-op experts are free, and
dispatch and combine (gathers, scatters, the gate multiply) are not counted. An expert-choice
MoE's predictor (model.moe.predictor) counts as MoD's with E outputs, 2*n*(D*H + H*E), and its
backward 2*n*(D*H + 2*H*E) (stop_gradient(h) as well).
"""

from __future__ import annotations

import time

from modxla.config import Config, ModelConfig
from modxla.model.mod import capacity_k
from modxla.model.moe import expert_capacity

# Dense bf16 peak per chip, from the Cloud TPU documentation.
TPU_PEAK_FLOPS = {"v4": 275e12, "v5e": 197e12, "v5litepod": 197e12, "v5p": 459e12, "v6e": 918e12}


def block_flops(cfg: ModelConfig, n: int, moe: bool = False) -> dict[str, int]:
    """Forward FLOPs of one block's f over n tokens (one sequence); `moe`: its MLP is the MoE."""
    d, f = cfg.d_model, cfg.ffn_dim
    slots = cfg.moe.experts * expert_capacity(cfg.moe, n) if moe else n
    out = {
        "attn_proj": 2 * n * d * d * 4,  # q, k, v, o
        "attn_scores": 2 * 2 * n * n * d,  # q k^T and p v, all heads
        "mlp": 2 * slots * d * f * (3 if cfg.mlp == "swiglu" else 2),
    }
    if moe:
        out["router"] = 2 * n * d * (cfg.moe.experts + cfg.moe.noop_experts)
        if cfg.moe_predictor_layers:
            out["predictor"] = 2 * n * _moe_predictor_params(cfg, fc2_bias=False)
    return out


def _moe_predictor_params(cfg: ModelConfig, fc2_bias: bool = True) -> int:
    """An expert-choice MoE predictor's fc1 (D x H) and fc2 (H x E) weights; with the biases
    (H + E) when fc2_bias, as MoD's predictor count does."""
    d, h, e = cfg.d_model, cfg.mod.predictor_hidden, cfg.moe.experts
    return d * h + h * e + (h + e if fc2_bias else 0)


def forward_flops(cfg: ModelConfig, seq_len: int) -> dict[str, int]:
    """Forward FLOPs for one sequence of `seq_len` tokens, by component, with a total."""
    t, d = seq_len, cfg.d_model
    routed = set(cfg.routed_layers)
    k = capacity_k(cfg.mod.capacity, t)
    out = {"embedding": 0, "attn_proj": 0, "attn_scores": 0, "mlp": 0, "router": 0, "predictor": 0}
    moe = set(cfg.moe_layers)
    for i in range(cfg.num_layers):
        for name, v in block_flops(cfg, k if i in routed else t, i in moe).items():
            out[name] += v
    n_routed = len(routed)
    if cfg.mod.router == "learned":
        out["router"] += n_routed * 2 * t * d
    if cfg.mod.predictor:
        h = cfg.mod.predictor_hidden
        out["predictor"] += n_routed * 2 * t * (d * h + h)
    out["head"] = 2 * t * d * cfg.vocab_size
    out["total"] = sum(out.values())
    return out


def backward_flops(cfg: ModelConfig, seq_len: int) -> int:
    """Backward FLOPs for one sequence: 2x the forward where gradients flow through."""
    fwd = forward_flops(cfg, seq_len)
    out = 2 * (fwd["total"] - fwd["predictor"])
    if cfg.mod.predictor:  # stop_gradient(x): no input gradient for fc1
        h = cfg.mod.predictor_hidden
        out += len(cfg.routed_layers) * 2 * seq_len * (cfg.d_model * h + 2 * h)
    k = capacity_k(cfg.mod.capacity, seq_len)
    routed = set(cfg.routed_layers)
    for i in cfg.moe_predictor_layers:  # the same for the experts' top-C predictor
        n = k if i in routed else seq_len
        h, e = cfg.mod.predictor_hidden, cfg.moe.experts
        out += 2 * n * (cfg.d_model * h + 2 * h * e)
    return out


def flops_per_step(cfg: Config) -> int:
    """Training FLOPs of one optimizer step: (forward + backward) x global batch x accum."""
    t = cfg.data.seq_len
    per_seq = forward_flops(cfg.model, t)["total"] + backward_flops(cfg.model, t)
    return per_seq * cfg.train.batch_size * cfg.train.grad_accum


def param_count(cfg: ModelConfig, exclude_embeddings: bool = False) -> int:
    """Parameters of the model a config builds, without building it."""
    d, f, v = cfg.d_model, cfg.ffn_dim, cfg.vocab_size
    mlp = d * f * (3 if cfg.mlp == "swiglu" else 2)
    block = 4 * d * d + mlp + 2 * d
    n_routed = len(cfg.routed_layers)
    moe = cfg.moe  # an MoE layer: E experts' MLPs in place of one, and its router
    moe_extra = (moe.experts - 1) * mlp + d * (moe.experts + moe.noop_experts)
    extra = 0
    if cfg.mod.router == "learned":
        extra += d
    if cfg.mod.predictor:
        h = cfg.mod.predictor_hidden
        extra += d * h + h + h + 1
    if cfg.moe_predictor_layers:
        moe_extra += _moe_predictor_params(cfg)
    n = cfg.num_layers * block + n_routed * extra + len(cfg.moe_layers) * moe_extra + d
    emb = v * d
    head = 0 if cfg.tie_embeddings else v * d
    return n + head + (0 if exclude_embeddings else emb)


def tpu_peak_flops(device_kind: str) -> float | None:
    kind = device_kind.lower().replace(" ", "")
    for name, peak in sorted(TPU_PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if name in kind:
            return peak
    return None


def measure_matmul_peak(device=None, n: int = 1024, reps: int = 5) -> float:
    """FLOP/s of a square fp32 matmul on `device` (the CPU's achievable peak for MFU)."""
    import torch

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    (a @ b).sum().item()  # warm up (and compile, under XLA)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def mfu(flops_step: int, step_time_s: float, peak_per_device: float, num_devices: int) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the devices' summed peak."""
    if step_time_s <= 0 or peak_per_device <= 0:
        return 0.0
    return flops_step / step_time_s / (peak_per_device * num_devices)
