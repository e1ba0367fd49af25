"""The test-time scaling fit recovers known curves, reports honest uncertainty, and plots a real PNG."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.evaluation.curves import FitError, fit_loop_curve, plot_loop_curve

LOOPS = [1, 2, 4, 8, 16, 32]


@pytest.mark.parametrize(("l_inf", "k", "z"), [(3.2, 1.5, 0.4), (4.56, 0.34, 2.2), (2.0, -0.3, 0.05), (5.0, 2.0, 1.0)])
def test_exact_points_give_back_the_parameters(l_inf, k, z):
    t = np.array(LOOPS, dtype=float)
    fit = fit_loop_curve(LOOPS, l_inf + k * np.exp(-z * t))
    assert fit.l_inf == pytest.approx(l_inf, abs=1e-6)
    assert fit.k == pytest.approx(k, rel=1e-4)
    assert fit.z == pytest.approx(z, rel=1e-4)
    assert fit.rmse < 1e-7 and fit.points == 6 and not fit.z_at_bound


def test_noisy_points_are_within_a_few_standard_errors():
    rng = np.random.default_rng(0)
    t = np.array([1, 2, 3, 4, 6, 8, 12, 16, 24, 32], dtype=float)
    truth = (3.0, 1.2, 0.3)
    misses = []
    for _ in range(40):
        y = truth[0] + truth[1] * np.exp(-truth[2] * t) + rng.normal(0, 0.01, t.shape)
        fit = fit_loop_curve(t, y)
        estimates = (fit.l_inf, fit.k, fit.z)
        errors = (fit.l_inf_stderr, fit.k_stderr, fit.z_stderr)
        assert all(e is not None and e > 0 for e in errors)
        misses.append([abs(est - true) / err for est, true, err in zip(estimates, truth, errors, strict=True)])
        assert fit.rmse == pytest.approx(0.01, rel=0.6)
    # standard errors are calibrated: most estimates lie within 2 of them, all within 5
    misses = np.array(misses)
    assert (misses < 2).mean() > 0.8 and misses.max() < 5


def test_three_points_fit_without_uncertainty_and_fewer_are_refused():
    fit = fit_loop_curve([1, 2, 4], [5.0, 4.5, 4.3])
    assert fit.l_inf_stderr is None and fit.z_stderr is None
    assert fit.predict(np.array([1, 2, 4])) == pytest.approx([5.0, 4.5, 4.3], abs=1e-6)
    with pytest.raises(FitError, match=">= 3 distinct loop counts, got 1, 2$"):  # plain numbers, no np.float64
        fit_loop_curve([1, 1, 2], [5.0, 5.0, 4.0])
    with pytest.raises(FitError, match="non-finite"):
        fit_loop_curve([1, 2, 4], [5.0, float("nan"), 4.0])


def test_plot_is_a_valid_png(tmp_path):
    losses = [4.0 + np.exp(-0.5 * t) for t in LOOPS]
    fit = fit_loop_curve(LOOPS, losses)
    path = tmp_path / "curve.png"
    plot_loop_curve({"a": (LOOPS, losses, fit), "b (no fit)": (LOOPS, [x + 0.1 for x in losses], None)}, "t", path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200


def test_a_plot_of_no_curve_says_so_without_a_warning(tmp_path):
    """A sweep none of whose runs has validated yet: `parcae sweep summary` still writes curves.png (matplotlib
    warned "No artists with labels found to put in legend" for the empty legend)."""
    import warnings

    path = tmp_path / "curve.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figure = plot_loop_curve({}, "t", path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [t.get_text() for t in figure.axes[0].texts] == ["no validation curve yet"]
