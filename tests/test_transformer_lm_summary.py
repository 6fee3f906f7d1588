"""benchmarks.transformer_lm's report on hand-made curves (ratios computed by hand)."""

from benchmarks import transformer_lm


def _record(steps, seconds, losses):
  return {"step": steps, "seconds": seconds, "validation_loss": losses,
          "compile_seconds": 0.0, "train_loss": []}


def test_summary_counts_updates_and_seconds_to_adamws_final_loss():
  curves = {
      "adamw": _record([0, 10, 20], [0.0, 1.0, 2.0], [5.0, 3.0, 2.0]),
      "kfac": _record([0, 2, 4], [0.0, 1.0, 2.0], [5.0, 2.5, 1.9]),
      "curveball": _record([0, 8], [0.0, 2.0], [5.0, float("nan")]),
      "adamw@kfac": _record([0, 2, 4], [0.0, 0.1, 0.2], [5.0, 4.5, 4.0]),
  }
  summary = transformer_lm.summarise(curves)
  assert summary["adamw_final_validation_loss"] == 2.0
  kfac = summary["optimisers"]["kfac"]
  # AdamW: 20 updates, 2 s to 2.0; KFAC: first at or below 2.0 after 4 updates, 2 s.
  assert (kfac["updates_to_target"], kfac["update_ratio"]) == (4, 5.0)
  assert (kfac["seconds_to_target"], kfac["wall_clock_ratio"]) == (2.0, 1.0)
  # AdamW needed all 20 updates for KFAC's final 1.9 and never got there.
  assert kfac["adamw_updates_to_this_loss"] is None
  assert summary["optimisers"]["curveball"]["update_ratio"] is None  # diverged
  # Per update: AdamW over KFAC's 4 updates ends at 4.0; KFAC is there after 2.
  assert summary["per_update"]["kfac"] == {"updates_to_target": 2, "update_ratio": 2.0}
  assert "kfac reaches it after 2 updates (2× fewer)" in transformer_lm.markdown(summary)
