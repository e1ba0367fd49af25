"""TensorBoard tags by purpose, and a custom-scalars layout whose every chart finds the tags written for it."""

from __future__ import annotations

import re

from pipeline.evaluation.dashboard import LAYOUT, STABILITY_LIMIT, loop_tags, source_val_key, tag

RECORD = [  # what a Parcae run's metrics.jsonl holds, and what parcae eval and downstream scoring add
    "loss", "val_loss_loops_1", "val_loss_loops_4", "val_loss_loops_4_std", "lr", "grad_norm", "nonfinite_skipped",
    "spikes_skipped", "spectral_radius", "a_bar_mean", "loops_mean", "tokens_per_s", "samples_per_s", "step_time_s",
    "data_wait_s", "mfu", "hfu", "tokens_seen", "memory_max_rss_gb", "downstream/core_loops_4", "eval/loss_loops_8",
    "eval/fit_l_inf", "val_fit_l_inf", "data/web/tokens", "data/web/epochs", "data/web/share", "val/web/loss_T4",
]  # fmt: skip


def test_tags_by_purpose_without_repeated_prefixes():
    assert tag("loss") == "loss/train" and tag("val_loss") == "loss/val"
    assert tag("val_loss_loops_4") == "scaling/val_loss_T4" and tag("val_loss_loops_4_std") == "scaling/val_loss_T4_std"
    assert tag("spectral_radius") == "loops/spectral_radius" and tag("lr") == "optim/lr"
    assert (
        tag("tokens_per_s") == "throughput/tokens_per_s" and tag("memory_allocated_gb") == "system/memory_allocated_gb"
    )
    assert tag("downstream/core_loops_2") == "downstream/core_loops_2"
    assert source_val_key("code", "val_loss_loops_4") == "val/code/loss_T4" == tag("val/code/loss_T4")
    assert source_val_key("code", "val_loss_loops_4_std") == "val/code/loss_T4_std"
    assert source_val_key("code", "val_loss") == "val/code/loss"  # the GPT baseline
    assert loop_tags([{"h_norm": 2.0, "relative_change": 0.5}] * 2) == {
        "loops/h_norm_L01": 2.0, "loops/h_change_L01": 0.5, "loops/h_norm_L02": 2.0, "loops/h_change_L02": 0.5,
    }  # fmt: skip


def test_every_chart_of_the_layout_finds_its_tags():
    written = (
        {tag(k) for k in RECORD} | {"loss/val", STABILITY_LIMIT} | set(loop_tags([{"h_norm": 1, "relative_change": 1}]))
    )
    assert not any(t.startswith("other/") for t in written)
    for category, charts in LAYOUT.items():
        for title, (kind, patterns) in charts.items():
            assert kind == "Multiline"
            for pattern in patterns:
                assert any(re.match(pattern, t) for t in written), (category, title, pattern)
    curve = LAYOUT["test-time scaling"]["validation loss at each loop count T, and the fitted L_inf"][1][0]
    assert not re.match(curve, "scaling/val_loss_T4_std")  # the spread is not a line of the curve


def test_a_chart_holds_lines_of_one_scale():
    """Mean A_bar lies in (0, 1) and the sampled loop counts are about the mean recurrence (8): on one chart
    the first would be a flat line at the bottom; so would the relative change beside the state norm."""

    def charts_of(name: str) -> set[str]:
        return {
            title
            for charts in LAYOUT.values()
            for title, (_, pats) in charts.items()
            if any(re.match(p, name) for p in pats)
        }

    for a, b in [("loops/a_bar_mean", "loops/loops_mean"), ("loops/h_norm_L01", "loops/h_change_L01")]:
        assert charts_of(a) and charts_of(b) and not charts_of(a) & charts_of(b), (a, b)
