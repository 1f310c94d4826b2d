"""The balancing cost model measured on this machine: the fit, and `varlen bench calibrate` end to end."""
import json

import pytest

from varlen.cli import main
from varlen.train.calibrate import fit, fit_comm, load


def test_fit_recovers_a_known_cost_model():
    lengths = [64, 256, 1024, 4096]
    cost = fit(lengths, [3e-6 * L + 2e-9 * L * L for L in lengths])
    assert cost.a == pytest.approx(3e-6, rel=1e-9) and cost.b == pytest.approx(2e-9, rel=1e-9)


def test_fit_never_returns_a_negative_attention_term():
    cost = fit([100, 200, 400], [1.0, 1.9, 3.7])  # per-token time falls with length: noise on a tiny model
    assert cost.b == 0 and cost.a > 0


def test_fit_comm_recovers_the_per_byte_slope():
    rows = [{"leaving_bytes": n, "seconds": 2e-4 + 1e-9 * n} for n in (2**19, 2**21, 2**23)]
    per_call, per_byte = fit_comm(rows)
    assert per_call == pytest.approx(2e-4, rel=1e-6) and per_byte == pytest.approx(1e-9, rel=1e-6)
    # Noise that tilts the line below zero at the origin: the slope through the origin instead.
    per_call, per_byte = fit_comm([{"leaving_bytes": 1e6, "seconds": 1e-3}, {"leaving_bytes": 2e6, "seconds": 3e-3}])
    assert per_call == 0 and per_byte > 0


def test_calibrate_cli_saves_a_model_training_can_load(tmp_path, capsys):
    # Two real gloo processes time the all-to-all; the saved c is what the sequence-parallel planner reads.
    from varlen.config import ModelConfig
    from varlen.data.sp_plan import SPCost, a2a_bytes_per_token
    out = tmp_path / "cost.json"
    model = ["--model.dim", "32", "--model.n_layer", "1", "--model.n_head", "2", "--model.n_kv_head", "1",
             "--model.max_seq_len", "64"]
    assert main(["bench", "calibrate", "--lengths", "16,64", "--tokens", "256", "--repeats", "1", "--threads", "1",
                 "--comm-mib", "0.25,1", "--out", str(out), *model]) == 0
    doc = json.loads(out.read_text())
    assert [r["length"] for r in doc["timings"]] == [16, 64] and all(r["seconds_per_seq"] > 0 for r in doc["timings"])
    assert doc["comm"]["ranks"] == 2 and [r["send_bytes"] for r in doc["comm"]["timings"]] == [2**18, 2**20]
    assert all(r["seconds"] > 0 and r["leaving_bytes"] == r["send_bytes"] // 2 for r in doc["comm"]["timings"])
    cost = load(out)
    assert isinstance(cost, SPCost) and cost.a >= 0 and cost.b >= 0 and cost(64) > cost(16) > 0
    cfg = ModelConfig(dim=32, n_layer=1, n_head=2, n_kv_head=1, max_seq_len=64)
    assert cost.c > 0 and cost.c == pytest.approx(doc["comm"]["seconds_per_byte"] * a2a_bytes_per_token(cfg))
    assert cost.seq_time(64, 2) > cost(64) / 2  # splitting a sequence now costs its exchange
    # Training in bf16 autocast moves 2-byte activations: half the bytes, half the c.
    assert load(out, cfg, element_bytes=2).c == pytest.approx(cost.c / 2)
    assert str(out) in capsys.readouterr().out


def test_default_lengths_fit_the_model(tmp_path):
    # The defaults (up to 2048) on a model of 200 positions: the ones below it and 200, not an error.
    out = tmp_path / "cost.json"
    assert main(["bench", "calibrate", "--tokens", "256", "--repeats", "1", "--threads", "1", "--comm-ranks", "0",
                 "--out", str(out), "--model.dim", "32", "--model.n_layer", "1", "--model.n_head", "2",
                 "--model.n_kv_head", "1", "--model.max_seq_len", "200"]) == 0
    doc = json.loads(out.read_text())
    assert [r["length"] for r in doc["timings"]] == [128, 200] and doc["c"] == 0 and doc["comm"] is None


def test_a_cost_model_saved_without_c_loads_with_free_communication(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"a": 1e-5, "b": 1e-9}))
    assert load(path).c == 0


@pytest.mark.parametrize("argv, needle", [
    (["--lengths", "16,abc"], "--lengths"),
    (["--lengths", "0,16"], "positive"),
    (["--lengths", "128", "--model.max_seq_len", "64"], "model.max_seq_len"),
    (["--comm-mib", "1,x"], "--comm-mib"),
    (["--comm-mib", "0"], "positive"),
    (["--comm-ranks", "1"], "--comm-ranks"),
])
def test_calibrate_bad_input_names_the_option(tmp_path, capsys, argv, needle):
    assert main(["bench", "calibrate", "--out", str(tmp_path / "c.json"), *argv]) == 2
    assert needle in capsys.readouterr().err


def test_missing_cost_model_file_says_how_to_make_one(tmp_path):
    from varlen.config import ConfigError
    with pytest.raises(ConfigError, match="varlen bench calibrate"):
        load(tmp_path / "nope.json")
