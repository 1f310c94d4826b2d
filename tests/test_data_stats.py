"""`varlen data stats`: counts, length percentiles and a histogram PNG of a corpus."""
import re

from varlen.cli import main as cli_main

from .helpers import python_corpus


def test_data_stats_reports_lengths_and_draws_a_histogram(tmp_path, capsys):
    corpus = python_corpus(tmp_path / "corpus", n_files=25)
    png = tmp_path / "hist.png"
    rc = cli_main(["data", "stats", str(corpus), "--glob", "*.py", "--vocab-size", "400", "--plot", str(png)])
    out = capsys.readouterr().out
    assert rc == 0
    assert re.search(r"documents\s+25\b", out)
    assert re.search(r"length pct\s+p10 [\d,]+\s+p50 [\d,]+\s+p90 [\d,]+\s+p99 [\d,]+\s+max [\d,]+", out)
    entropy = float(re.search(r"unigram entropy\s+([\d.]+)", out).group(1))
    assert 0 < entropy < 6.0  # at most log(400) = 5.99 nats
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
