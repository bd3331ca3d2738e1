"""The paired bootstrap of ``mmtard.experiments.stats`` against hand computations."""

from __future__ import annotations

import pytest

from mmtard.experiments.stats import frontier_margin, outcome_matrix, paired_bootstrap


def test_identical_models_differ_by_zero_with_a_zero_interval():
    d = paired_bootstrap(["1010", "0110"], ["1010", "0110"])
    assert (d.mean, d.low, d.high, d.seeds, d.images) == (0.0, 0.0, 0.0, 2, 4)


def test_the_mean_is_the_difference_of_accuracies_over_seeds_and_images():
    # model: 3/4 and 2/4 correct; baseline: 1/4 and 2/4 -> (75 + 50)/2 - (25 + 50)/2 = 25 points
    d = paired_bootstrap(["1110", "1100"], ["1000", "0110"])
    assert d.mean == pytest.approx(25.0)
    assert d.low <= d.mean <= d.high


def test_two_images_one_seed_interval_by_hand():
    """Differences (1, 0): a resample's mean is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4, so the 2.5% and
    97.5% percentiles are 0 and 100 points."""
    d = paired_bootstrap(["10"], ["00"], resamples=4000)
    assert d.mean == 50.0 and d.low == 0.0 and d.high == 100.0


def test_pairing_keeps_a_constant_shift_exact():
    """The model is right on the baseline's images plus one more: the interval stays within [0, 40] points."""
    model, baseline = ["1" * 10], ["0" + "1" * 9]
    d = paired_bootstrap(model, baseline, resamples=2000)
    assert d.mean == pytest.approx(10.0) and 0.0 <= d.low < d.high <= 40.0


def test_outcomes_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="same images"):
        outcome_matrix(["101", "10"])
    with pytest.raises(ValueError, match="same seeds and images"):
        paired_bootstrap(["10", "11"], ["10"])


def test_frontier_margin_by_hand():
    """Frontier points (robust 20 %, clean 80 %) and (40 %, 60 %): at the candidate's robust 30 % the line is at clean
    70 %, so a candidate with clean 75 % lies 5 points above it; beyond the ends the line is flat."""

    def model(clean_correct, robust_correct, seeds=2):
        return (
            ["1" * clean_correct + "0" * (10 - clean_correct)] * seeds,
            ["1" * robust_correct + "0" * (10 - robust_correct)] * seeds,
        )

    frontier = [model(8, 2, seeds=1), model(6, 4, seeds=3)]
    above = frontier_margin(
        (["1" * 15 + "0" * 5] * 2, ["1" * 3 + "0" * 7] * 2),
        [
            (["1" * 16 + "0" * 4], ["1" * 2 + "0" * 8]),
            (["1" * 12 + "0" * 8] * 3, ["1" * 4 + "0" * 6] * 3),
        ],
    )
    assert above.mean == pytest.approx(5.0) and above.low <= 5.0 <= above.high and above.images == 20
    # more robust than the whole frontier: compared with its most robust point (clean 60 %)
    beyond = frontier_margin(model(7, 9), frontier)
    assert beyond.mean == pytest.approx(10.0)
    with pytest.raises(ValueError, match="same clean images"):
        frontier_margin((["1" * 5], ["1"]), frontier)
