"""``make demo``: its Adam rate is the benchmark's choice, and it runs end to end (tiny)."""

import json
import pathlib

import pytest

from curvax import demo

RESULTS = pathlib.Path(__file__).parent.parent / "benchmarks" / "results"


def test_adam_rate_is_the_benchmark_choice():
  data = json.loads((RESULTS / "time_to_loss.json").read_text())
  assert demo.ADAM_LEARNING_RATE == data["curves"]["autoencoder"]["adam"]["learning_rate"]


def test_verdict_reads_times_off_the_records():
  records = {"a": {"seconds": [0, 5, 10], "loss": [9.0, 4.0, 2.0]},
             "b": {"seconds": [0, 5, 10], "loss": [9.0, 1.5, 1.0]},
             "c": {"seconds": [0, 5, 10], "loss": [9.0, 8.0, 3.0]}}
  text = demo.verdict(records)
  assert "a ends at 2.0 after 10 s (reached at 10 s)" in text
  assert "b ends at 1.0; it reached 2.0 after 5 s (0.50× a's time)" in text
  assert "c ends at 3.0; it did not reach 2.0" in text


@pytest.mark.filterwarnings("ignore")
def test_demo_runs_small(tmp_path, capsys):
  records = demo.run(budget=0.4, every=0.2, scale=0.01, plot=str(tmp_path / "demo.png"))
  assert (tmp_path / "demo.png").stat().st_size > 0
  for record in records.values():
    assert record["seconds"][-1] >= 0.4 and len(record["loss"]) == 3
  assert "curvax.kfac(loss)" in capsys.readouterr().out
