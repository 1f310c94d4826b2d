"""Configs: every preset loads and validates; overrides take the field's type."""
import pytest

from varlen.config import Config, ConfigError, load_config, preset_names


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_loads(preset):
    cfg = load_config(preset=preset)
    assert cfg.model.max_seq_len <= cfg.data.tokens_per_step


def test_presets_include_tiny_and_small():
    assert {"tiny", "small"} <= set(preset_names())


def test_overrides_and_files_layer_over_the_preset(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model:\n  dim: 96\ntrain:\n  lr: 1.0e-3\n")
    cfg = load_config("tiny", str(f), {"model.n_layer": "3", "train.compile": "true", "data.field": "body"})
    assert (cfg.model.dim, cfg.model.n_layer, cfg.train.lr) == (96, 3, 1e-3)
    assert cfg.train.compile is True and cfg.data.field == "body"


def test_config_round_trips_through_a_dict():
    cfg = load_config("small")
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_unknown_field_lists_the_known_ones():
    with pytest.raises(ConfigError, match="model has: .*dim"):
        load_config(overrides={"model.width": "3"})
