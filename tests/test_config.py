"""Configs: YAML over defaults, base chains, dotted overrides, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from brats_psp.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    flatten,
    load_config,
    save_config,
)
from tests.conftest import REPO

CONFIGS = REPO / "configs"


def test_defaults_without_a_file() -> None:
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.model.bins == [1, 2, 3, 6]
    assert cfg.tracking.experiment == "brats_psp"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_resolves(path: Path) -> None:
    # each shipped config builds its network, and the network takes the config's input channels
    import torch

    from brats_psp.networks import build_network

    cfg = load_config(path)
    net = build_network(cfg.model, cfg.data.in_channels).eval()
    with torch.inference_mode():
        out = net(torch.zeros(1, cfg.data.in_channels, 33, 31))
    assert out.masks.shape == (1, 3 if cfg.model.output == "sigmoid" else 4, 33, 31)


def test_input_channels_are_four_contrasts_per_slice_of_the_slab() -> None:
    assert load_config(CONFIGS / "smoke.yaml").data.in_channels == 4  # 2D
    assert load_config(CONFIGS / "default.yaml").data.in_channels == 12  # 2.5D: 3 slices of 4 contrasts
    assert load_config(None, ["data.context_slices=2"]).data.in_channels == 20


def test_default_yaml_lists_exactly_the_code_defaults() -> None:
    body = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    assert config_to_dict(load_config(CONFIGS / "default.yaml")) == config_to_dict(Config())
    assert {s: set(v) for s, v in body.items()} == {s: set(v) for s, v in config_to_dict(Config()).items()}


def test_smoke_overrides_default() -> None:
    default = load_config(CONFIGS / "default.yaml")
    smoke = load_config(CONFIGS / "smoke.yaml")
    assert smoke.train.epochs < default.train.epochs
    assert smoke.tracking.experiment == default.tracking.experiment


def test_dotted_overrides_are_typed() -> None:
    cfg = load_config(None, ["train.epochs=6", "train.lr=3e-4", "model.bins=[1,2,4]", "data.root=null", "train.deterministic=true"])
    assert cfg.train.epochs == 6 and cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.bins == [1, 2, 4] and cfg.data.root is None and cfg.train.deterministic is True
    assert isinstance(load_config(None, ["train.lr=1"]).train.lr, float)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochz=3", "unknown key train.epochz"),
        ("trian.epochs=3", "unknown section 'trian'"),
        ("train.epochs=three", "train.epochs: expected int, got str"),
        ("train.epochs=2.5", "train.epochs: expected int, got float"),
        ("train.deterministic=1", "train.deterministic: expected bool"),
        ("model.bins=6", "model.bins: expected a list"),
        ("model.bins=[1,x]", r"model.bins\[1\]: expected int"),
        ("model.depth=19", r"model.depth: 19 is not one of \[18, 34, 50, 101\]"),
        ("train.lr=-0.1", "train.lr: -0.1 is out of range"),
        ("data.fold=7", "data.fold: 7 is out of range"),
        ("data.intensity_percentiles=[99.5,0.5]", "data.intensity_percentiles: .* is out of range"),
        ("epochs=3", "must be section.key"),
        ("train.epochs", "not of the form"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_key_in_a_file_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key train.learning_rate"):
        load_config(path)


def test_base_chain_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("train:\n  epochs: 3\n  lr: 0.01\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain:\n  epochs: 5\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert (cfg.train.epochs, cfg.train.lr) == (5, 0.01)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "loop.yaml")


def test_yaml_is_read_with_the_safe_loader(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "smoke.yaml", ["train.lr=0.002"])
    save_config(cfg, tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert config_to_dict(again) == config_to_dict(cfg)
    flat = flatten(config_to_dict(cfg))
    assert flat["train.lr"] == 0.002 and "model.bins" in flat
