"""The demo end to end on the real offline zoo (slow: builds or reuses the fine-tuned experts)."""

import json

import numpy as np
import pytest

import hm3
from hm3.demo import run_demo


@pytest.mark.slow
def test_demo_merges_scores_and_times_the_four_experts(tmp_path):
    lines = []
    report = run_demo(tmp_path / "demo", progress=False, echo=lines.append)

    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert saved["merged"]["mean_macro_f1"] == pytest.approx(report["merged"]["mean_macro_f1"])
    assert set(report["merged"]["tasks"]) == set(report["experts"]) == {
        "spam", "sentiment", "topic", "question"}
    for task, scores in report["merged"]["tasks"].items():
        assert 0 <= scores["macro_f1"] <= 1 and scores["n"] >= 300
        assert report["experts"][task]["n"] == scores["n"]
    for task in ("sentiment", "topic", "question"):
        check = report["merged"]["tasks"][task]["cross_checks"]["spam"]
        assert check["expected"] == "ham" and 0 <= check["agreement"] <= 1
    assert [row["batch_size"] for row in report["bench"]["rows"]] == [1, 8, 32]
    calibration = report["label_free"]["calibration"]
    assert set(calibration) == set(report["experts"])
    assert all(0 < entry["texts"] <= 256 for entry in calibration.values())
    for task, entry in report["label_free"]["recentre"]["tasks"].items():
        assert entry["after"] == pytest.approx(entry["target"], abs=2 / 256), task
    assert any("merged model:" in line for line in lines)

    merged = hm3.load(report["merged_model"], device="cpu")
    assert merged.tasks == ["spam", "sentiment", "topic", "question"]
    probabilities = merged.predict_proba(["WIN a free prize now, text CLAIM"])
    for task, p in probabilities.items():
        assert np.isclose(p.sum(), 1.0), task
