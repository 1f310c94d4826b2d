"""The balancing cost model measured on this machine: the fit, and `varlen bench calibrate` end to end."""
import json

import pytest

from varlen.cli import main
from varlen.train.calibrate import fit, load


def test_fit_recovers_a_known_cost_model():
    lengths = [64, 256, 1024, 4096]
    cost = fit(lengths, [3e-6 * L + 2e-9 * L * L for L in lengths])
    assert cost.a == pytest.approx(3e-6, rel=1e-9) and cost.b == pytest.approx(2e-9, rel=1e-9)


def test_fit_never_returns_a_negative_attention_term():
    cost = fit([100, 200, 400], [1.0, 1.9, 3.7])  # per-token time falls with length: noise on a tiny model
    assert cost.b == 0 and cost.a > 0


def test_calibrate_cli_saves_a_model_training_can_load(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert main(["bench", "calibrate", "--lengths", "16,64", "--tokens", "256", "--repeats", "1", "--threads", "1",
                 "--out", str(out), "--model.dim", "32", "--model.n_layer", "1", "--model.n_head", "2",
                 "--model.n_kv_head", "1", "--model.max_seq_len", "64"]) == 0
    doc = json.loads(out.read_text())
    assert [r["length"] for r in doc["timings"]] == [16, 64] and all(r["seconds_per_seq"] > 0 for r in doc["timings"])
    cost = load(out)
    assert cost.a >= 0 and cost.b >= 0 and cost(64) > cost(16) > 0
    assert str(out) in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["--lengths", "16,abc"], "--lengths"),
    (["--lengths", "0,16"], "positive"),
    (["--lengths", "128", "--model.max_seq_len", "64"], "model.max_seq_len"),
])
def test_calibrate_bad_input_names_the_option(tmp_path, capsys, argv, needle):
    assert main(["bench", "calibrate", "--out", str(tmp_path / "c.json"), *argv]) == 2
    assert needle in capsys.readouterr().err


def test_missing_cost_model_file_says_how_to_make_one(tmp_path):
    from varlen.config import ConfigError
    with pytest.raises(ConfigError, match="varlen bench calibrate"):
        load(tmp_path / "nope.json")
