from pathlib import Path

import pytest

from modxla.config import ConfigError, load_config, save_config

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


def test_configs_exist():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.d_model % cfg.model.num_heads == 0
    assert cfg.data.seq_len <= cfg.model.max_seq_len


def test_baseline_has_no_routed_blocks_and_mod_routes_every_other():
    root = CONFIGS[0].parent
    assert load_config(root / "baseline.yaml").model.routed_layers == []
    assert load_config(root / "mod_c12_every2.yaml").model.routed_layers == [1, 3, 5, 7]


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["model.mod.capacity=0.5", "train.steps=7", "data.source=/x/*.txt"])
    assert cfg.model.mod.capacity == 0.5
    assert cfg.train.steps == 7
    assert cfg.data.source == "/x/*.txt"
    cfg = load_config(None, ["optimizer.lr=1"])  # an int where a float is expected is fine
    assert isinstance(cfg.optimizer.lr, float)


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.mod.capacity=1.5", "model.mod.capacity"),
        ("model.mod.capacity=0", "model.mod.capacity"),
        ("model.num_heads=3", "model.num_heads"),
        ("model.d_model=abc", "model.d_model"),
        ("model.colour=blue", "model.colour"),
        ("model.mod.router=softmax", "model.mod.router"),
        ("data.seq_len=4096", "data.seq_len"),
        ("train.dtype=fp8", "train.dtype"),
        ("mesh.fsdp=0", "mesh.fsdp"),
        ("train.batch_size=true", "train.batch_size"),
        ("optimizer.beta2=1.5", "optimizer.beta2"),
        ("optimizer.beta1=-0.1", "optimizer.beta1"),
        ("train.eval_batches=0", "train.eval_batches"),
        ("train.eval_every=-1", "train.eval_every"),
        ("train.on_divergence=panic", "train.on_divergence"),
        ("train.divergence_window=0", "train.divergence_window"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        load_config(None, [override])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["model.d_model"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_relative_config_paths_resolve_from_the_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository
    assert load_config("configs/tiny.yaml").model.d_model == 64
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text("model: {d_model: 32, num_heads: 2}\n")
    assert load_config("configs/tiny.yaml").model.d_model == 32  # the working dir's wins


def test_the_old_routing_key_still_loads_as_router(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  mod:\n    capacity: 0.5\n    routing: random\n")
    cfg = load_config(old)
    assert cfg.model.mod.router == "random"
    assert load_config(None, ["model.mod.routing=random"]).model.mod.router == "random"
    with pytest.raises(ConfigError, match=r"^model.mod.routing: old name of model.mod.router"):
        load_config(old, ["model.mod.router=learned"])
    save_config(cfg, tmp_path / "new.yaml")
    assert "router: random" in (tmp_path / "new.yaml").read_text()


def test_user_errors_share_one_base_class():
    from modxla.data import DataError
    from modxla.errors import UserError
    from modxla.io.checkpoint import CheckpointError
    from modxla.parallel import MeshError

    for cls in (ConfigError, DataError, MeshError, CheckpointError):
        assert issubclass(cls, UserError), cls


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS[0].parent / "tiny.yaml", ["train.steps=3"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
