"""isoFLOP ladders: the rungs, their hand-computed sizes and steps, and the rungs a budget
chooses (pure functions: no training)."""

import pytest

from modxla.analysis import ladder
from modxla.cli import isoflop
from modxla.config import ConfigError, load_config

BATCH = ["train.batch_size=16", "data.max_chars=0"]


def _cfg(size, head, variant="baseline"):
    over = [*isoflop.size_overrides(size, head), *isoflop.VARIANTS[variant], *BATCH]
    return load_config("configs/tiny.yaml", over)


def test_rungs_grow_depth_and_width_together_with_hand_computed_numbers():
    sizes, head = ladder.ladder_sizes("aspect16")
    assert head == 16 and sizes[:4] == ["2x32", "3x48", "4x64", "5x80"] and sizes[-1] == "24x384"
    assert ladder.ladder_sizes("aspect32")[0][:2] == ["2x64", "3x96"]
    cfg = _cfg("5x80", 16)
    assert (cfg.model.num_layers, cfg.model.d_model, cfg.model.num_heads) == (5, 80, 5)
    # 2x32, vocab 512 tied, SwiGLU hidden 128 (85 rounded up to 64s), T 64, B 16:
    # block 4*32^2 + 3*32*128 + 2*32 = 16,448; 2 blocks + final norm 32 + embedding 16,384
    # forward per sequence: 2 x (524,288 proj + 524,288 scores + 1,572,864 MLP) + head
    # 2,097,152 = 7,340,032; x3 with the backward, x16 sequences = 352,321,536 per step
    r = ladder.rung("2x32", _cfg("2x32", 16), 1e12)
    assert r.params == 2 * 16_448 + 32 + 16_384 == 49_312
    assert r.steps == round(1e12 / 352_321_536) == 2838
    assert r.tokens == 2838 * 16 * 64 and r.tpp == pytest.approx(58.93, abs=0.01)
    # 3x48: block 4*48^2 + 3*48*128 + 96 = 27,744; forward 3 x 4,325,376 + head 3,145,728
    r = ladder.rung("3x48", _cfg("3x48", 16), 1e13)
    assert r.params == 3 * 27_744 + 48 + 512 * 48 == 107_856
    assert r.steps == round(1e13 / ((3 * 4_325_376 + 3_145_728) * 3 * 16)) == 12_922
    assert ladder.why_not(r, 12e6) == "3x48 would read 13.2 M tokens > 12.0 M"
    assert ladder.why_not(r, 15e6) == ""
    with pytest.raises(ConfigError, match="choose from aspect16, aspect32"):
        ladder.ladder_sizes("aspect7")


def _rungs(tokens):
    """Rungs r0.. of 1e5 * 2^i parameters, 1000 steps, the given tokens each."""
    return [ladder.Rung(f"r{i}", 100_000 * 2**i, 1000, t) for i, t in enumerate(tokens)]


def test_choose_takes_two_rungs_each_side_and_names_what_cuts_a_side_short():
    rungs = _rungs([1e7] * 10)  # 100 down to 0.2 tokens per parameter: r9's 0.195 is not
    # target 1.7e6 is nearest r4 (1.6e6): r2..r6 is 5, widened below first to 6
    chosen, warn = ladder.choose(rungs, 1.7e6, max_tokens=15e6)
    assert [r.size for r in chosen] == ["r1", "r2", "r3", "r4", "r5", "r6"] and warn == []
    # r0..r2 read too many tokens: one rung below the optimum is left, and the warning says why
    rungs = _rungs([20e6, 20e6, 20e6] + [1e7] * 7)
    chosen, warn = ladder.choose(rungs, 1.7e6, max_tokens=15e6)
    assert [r.size for r in chosen] == ["r3", "r4", "r5", "r6", "r7", "r8"]
    assert warn == [
        "1 size(s) below the predicted optimum r4 (1,700 k parameters): "
        "r2 would read 20.0 M tokens > 15.0 M"
    ]
    # the ladder's own end, and too few sizes in all
    chosen, warn = ladder.choose(_rungs([1e7] * 4), 1.1e5, max_tokens=15e6)
    assert [r.size for r in chosen] == ["r0", "r1", "r2", "r3"]
    assert warn == [
        "0 size(s) below the predicted optimum r0 (110 k parameters): the ladder ends there",
        "only 4 usable sizes (wanted 6)",
    ]


def test_the_cli_chooses_each_variants_rungs_from_the_budget(tmp_path, capsys):
    # predicted optima at 1e13: baseline 98 k * 10^0.6 = 390 k (nearest rung 5x80, 477 k),
    # MoD 116 k * 10^0.75 = 652 k (6x96, 724 k); MoD's 3x48 would read 17.2 M tokens
    assert ladder.predicted_optimum("baseline", 1e13) == pytest.approx(390_145, abs=1)
    argv = ["--budget", "1e13", "--ladder", "aspect16", "--set", *BATCH]
    assert isoflop.main([*argv, "--print-sizes"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "baseline 3x48 4x64 5x80 6x96 7x112 8x128",
        "mod_c12 4x64 5x80 6x96 7x112 8x128 9x144",
    ]
    assert err == ""
    assert isoflop.main([*argv, "--out", str(tmp_path)]) == 0
    cfg = load_config(tmp_path / "baseline_3x48.yaml")
    assert (cfg.model.d_model, cfg.model.num_heads, cfg.train.steps) == (48, 3, 12_922)
    assert len(list(tmp_path.glob("*.yaml"))) == 12
    capsys.readouterr()
    # 3e13: the data bound leaves the baseline one rung below its optimum, and says so
    argv = ["--budget", "3e13", "--ladder", "aspect16", "--set", *BATCH, "--print-sizes"]
    assert isoflop.main(argv) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "baseline 5x80 6x96 7x112 8x128 9x144 10x160"
    assert "baseline: 1 size(s) below the predicted optimum 6x96" in err
    assert "4x64 would read 18.0 M tokens > 15.0 M" in err
    with pytest.raises(SystemExit, match="2"):  # argparse: --print-sizes needs --ladder
        isoflop.main(["--budget", "1e13", "--sizes", "2x64", "--print-sizes"])
