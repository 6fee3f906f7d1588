"""benchmarks.time_to_result: AlgoPerf's scoring rules on a made-up table, and one tiny
trial end to end."""

import math

import numpy as np
import pytest

from benchmarks import time_to_result as ttr
from curvax.problems import datasets, suite

INF = math.inf
# Three workloads; ratios to the fastest: a (1, 2, ∞), b (2, 1, 1), c (5, ∞, 2).
TIMES = {"a": {"w1": 10.0, "w2": 20.0, "w3": INF},
         "b": {"w1": 20.0, "w2": 10.0, "w3": 30.0},
         "c": {"w1": 50.0, "w2": INF, "w3": 60.0}}


def test_performance_ratios_divide_by_the_fastest_and_keep_infinity():
  ratios = ttr.performance_ratios(TIMES)
  assert ratios == {"a": {"w1": 1.0, "w2": 2.0, "w3": INF},
                    "b": {"w1": 2.0, "w2": 1.0, "w3": 1.0},
                    "c": {"w1": 5.0, "w2": INF, "w3": 2.0}}


def test_nobody_reaching_a_target_gives_infinite_ratios_not_nan():
  ratios = ttr.performance_ratios({"a": {"w": INF}, "b": {"w": INF}})
  assert ratios == {"a": {"w": INF}, "b": {"w": INF}}


def test_profile_is_the_share_of_workloads_within_tau():
  ratios = [1.0, 2.0, INF]
  np.testing.assert_allclose(ttr.profile(ratios, [1.0, 1.5, 2.0, 3.9, 1e9]),
                             [1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3])


@pytest.mark.parametrize("name, expected", [
    # (r_max − r)/(r_max − 1) per workload within r_max = 4, 0 beyond, then the mean:
    ("a", (3 / 3 + 2 / 3 + 0) / 3),   # 5/9
    ("b", (2 / 3 + 3 / 3 + 3 / 3) / 3),  # 8/9
    ("c", (0 + 0 + 2 / 3) / 3),   # 2/9: ratio 5 > r_max counts nothing
])
def test_score_is_the_normalised_integral_of_the_profile(name, expected):
  ratios = list(ttr.performance_ratios(TIMES)[name].values())
  assert ttr.score(ratios, r_max=4.0) == pytest.approx(expected)
  # The same integral numerically, from the profile itself.
  tau = np.linspace(1.0, 4.0, 300001)
  numeric = np.trapezoid(ttr.profile(ratios, tau), tau) / 3.0
  assert numeric == pytest.approx(expected, abs=1e-4)


def test_external_time_is_the_median_over_studies_of_the_fastest_trial():
  # Fastest trial per study: 3, ∞, 2 → median 3 (not the median of all trials, 5,
  # nor the overall fastest, 2).
  assert ttr.external_time([[5.0, INF, 3.0], [INF, INF], [7.0, 2.0]]) == 3.0
  assert ttr.external_time([[INF], [INF], [1.0]]) == INF
  assert ttr.self_tuning_time([1.0, 4.0, INF]) == 4.0
  assert ttr.self_tuning_time([INF, 4.0, INF]) == INF


def test_times_of_reads_records_unreached_and_unsupported_as_infinity():
  data = {"external": {"w": {"kfac": {"studies": [
              [{"time_to_target": 4.0}, {"time_to_target": None}],
              [{"time_to_target": 6.0}, {"unsupported": "no"}],
              [{"time_to_target": None}]]}}},
          "self_tuning": {"w": {"kfra": {"seeds": [{"unsupported": "no"}] * 3}}}}
  assert ttr.times_of(data, "external") == {"kfac": {"w": 6.0}}
  assert ttr.times_of(data, "self_tuning") == {"kfra": {"w": INF}}


def test_trials_are_reproducible_per_study_and_differ_between_studies():
  first = ttr.sample_trials("kfac", "mlp", 0, 3)
  assert first == ttr.sample_trials("kfac", "mlp", 0, 3)
  assert first != ttr.sample_trials("kfac", "mlp", 1, 3)
  for hyper in first:
    assert hyper["batch_scale"] in ttr.BATCH_SCALE.values
    assert 1e-5 <= hyper["gamma"] <= 1e-2


def test_validation_images_are_never_trained_on():
  # The MLP trains on the longest prefix (30 000); the CNN has its own validation size.
  for name in ("mlp", "cnn"):
    prob = suite.problem(name)
    validation = suite.heldout(name)
    train = datasets.load_mnist("train", flatten=name != "cnn")
    start = train.size - validation.size
    assert prob.train.size <= start  # the training prefix ends before the held-out part
    np.testing.assert_array_equal(validation.labels, train.labels[start:])


def test_one_tiny_trial_end_to_end():
  w = ttr.workload("mlp", quick=True)._replace(budget=0.3)
  record = ttr.attempt(w, "nadamw", {"batch_scale": 2.0}, seed=0, budget=0.3,
                       target=1.0)  # an error rate of 1 is reached at once
  assert record["batch_size"] == 2 * w.problem.batch_size
  assert record["time_to_target"] is not None and record["steps"] >= 1
  assert 0.0 <= record["test"] <= 1.0
