"""The analytic FLOP counter against a hand count and against torch's own FLOP counter."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from modxla.analysis.flops import flops_per_step, forward_flops, mfu, param_count, tpu_peak_flops
from modxla.config import load_config
from modxla.model import build_model


def _small():
    return load_config(
        None,
        [
            "model.d_model=8",
            "model.num_heads=2",
            "model.num_layers=2",
            "model.d_ff=16",
            "model.vocab_size=10",
            "model.mod.capacity=0.5",
            "model.mod.every=2",
            "model.mod.predictor_hidden=4",
            "data.seq_len=4",
            "train.batch_size=2",
        ],
    )


def test_forward_flops_hand_count():
    f = forward_flops(_small().model, 4)
    # layer 0 dense over T=4: proj 2*4*8*8*4, scores 4*4*4*8, swiglu 2*4*8*16*3
    assert f["attn_proj"] == 2048 + 1024  # + layer 1 routed over k=2
    assert f["attn_scores"] == 512 + 128
    assert f["mlp"] == 3072 + 1536
    assert f["router"] == 2 * 4 * 8
    assert f["predictor"] == 2 * 4 * (8 * 4 + 4)
    assert f["head"] == 2 * 4 * 8 * 10
    assert f["embedding"] == 0
    assert f["total"] == 9312
    # backward: 2x forward, but the predictor (on stop_gradient(x)) has no fc1 input gradient
    assert flops_per_step(_small()) == (9312 + 2 * (9312 - 288) + 2 * 4 * (8 * 4 + 2 * 4)) * 2


@pytest.mark.parametrize(
    "over",
    [[], ["model.mod.capacity=1.0"], ["model.mlp=gelu", "model.tie_embeddings=false"]],
    ids=["mod", "baseline", "gelu_untied"],
)
def test_forward_flops_match_torch_flop_counter(over):
    cfg = load_config(
        None,
        [
            "model.d_model=64",
            "model.num_layers=4",
            "model.vocab_size=100",
            "model.mod.capacity=0.25",
            "data.seq_len=32",
            *over,
        ],
    )
    model = build_model(cfg.model, seed=0)
    counter = FlopCounterMode(display=False)
    # The math backend runs attention as matmuls, which the counter sees (CPU flash does not).
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(torch.randint(0, 100, (1, 32)))
    assert forward_flops(cfg.model, 32)["total"] == counter.get_total_flops()


def test_param_count_matches_the_built_model():
    for over in ([], ["model.mod.capacity=1.0"], ["model.tie_embeddings=false"]):
        cfg = load_config(None, ["model.d_model=64", "model.num_layers=4", *over])
        model = build_model(cfg.model)
        assert param_count(cfg.model) == model.num_params()
        assert param_count(cfg.model, True) == model.num_params(exclude_embeddings=True)


def test_mod_cuts_flops_per_step_as_the_paper_reports():
    base = load_config("configs/baseline.yaml")
    mod = load_config("configs/mod_c12_every2.yaml")
    ratio = flops_per_step(mod) / flops_per_step(base)
    assert 0.5 < ratio < 0.75  # the paper's small pair: 3.8e14 / 5.8e14 = 0.66


def test_mfu_and_peak_table():
    assert mfu(1e12, 0.5, 1e12, 4) == pytest.approx(0.5)
    assert mfu(1e12, 0.0, 1e12, 4) == 0.0
    assert tpu_peak_flops("TPU v5p") == 459e12
    assert tpu_peak_flops("v5litepod-8") == 197e12
    assert tpu_peak_flops("CPU") is None
