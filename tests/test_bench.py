"""Benchmark bookkeeping: batches, medians and the reduction arithmetic (no timing assertions)."""

import pytest
import torch

import hm3
from hm3 import bench
from hm3.bench import benchmark, format_bench
from hm3.errors import Hm3Error

from conftest import recipe_dict


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


class Encoding(dict):
    def to(self, device):
        return self


class FakeModel:
    """Each forward pass advances the fake clock by `cost` seconds; batches are recorded."""

    device = torch.device("cpu")

    def __init__(self, clock, cost):
        self.clock, self.cost, self.batches = clock, cost, []

    def encode(self, texts):
        self.batches.append(list(texts))
        return Encoding(n=len(texts))

    def model(self, n):
        self.clock.now += self.cost


def test_reduction_arithmetic_on_a_fake_clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(bench.time, "perf_counter", clock)
    merged = FakeModel(clock, 0.003)
    experts = [FakeModel(clock, 0.002), FakeModel(clock, 0.002)]
    result = benchmark(merged, experts, ["a", "b", "c", "d", "e"], batch_sizes=(1, 2, 8),
                       repeats=3, warmup=2)
    one, two, eight = result["rows"]
    assert [one["batches"], two["batches"], eight["batches"]] == [5, 2, 1]
    # Batch size 2 drops the ragged "e"; batch size 8 cycles the texts to fill one batch.
    assert merged.batches[5 * 5:5 * 5 + 2] == [["a", "b"], ["c", "d"]]
    assert merged.batches[-1] == ["a", "b", "c", "d", "e", "a", "b", "c"]
    assert len(merged.batches) == (2 + 3) * (5 + 2 + 1)
    for row in result["rows"]:
        assert row["merged_ms"] == pytest.approx(3.0)
        assert row["experts_ms"] == pytest.approx(4.0)
        assert row["expert_ms"] == pytest.approx([2.0, 2.0])
        assert row["reduction_pct"] == pytest.approx(25.0)
        assert row["ideal_pct"] == pytest.approx(50.0)
        assert row["of_ideal"] == pytest.approx(0.5)
    assert eight["merged_texts_per_s"] == pytest.approx(8 / 0.003)
    assert eight["experts_texts_per_s"] == pytest.approx(8 / 0.004)
    assert "25.0" in format_bench(result) and "50%" in format_bench(result)


def test_benchmark_rejects_bad_arguments():
    model = FakeModel(Clock(), 0.0)
    with pytest.raises(Hm3Error, match="at least one expert"):
        benchmark(model, [], ["a"])
    with pytest.raises(Hm3Error, match="at least one text"):
        benchmark(model, [model], [])
    with pytest.raises(Hm3Error, match=r"batch sizes must be positive integers, got \[0\]"):
        benchmark(model, [model], ["a"], batch_sizes=(0,))
    with pytest.raises(Hm3Error, match="repeats >= 1"):
        benchmark(model, [model], ["a"], repeats=0)


def test_benchmark_merged_family_is_consistent(family, tmp_path):
    base, experts = family
    hm3.merge(hm3.parse_recipe(recipe_dict(base, experts)), tmp_path / "merged", progress=False)
    merged = hm3.load(tmp_path / "merged", device="cpu")
    loaded = [hm3.load(path, task=task, device="cpu") for task, path in experts.items()]
    threads = torch.get_num_threads()
    result = benchmark(merged, loaded, ["good film", "bad news today", "win money"] * 3,
                       batch_sizes=(1, 4), repeats=2, warmup=1, threads=1)
    assert torch.get_num_threads() == threads  # restored
    assert (result["n_experts"], result["threads"], result["device"]) == (2, 1, "cpu")
    assert [row["batch_size"] for row in result["rows"]] == [1, 4]
    assert [row["batches"] for row in result["rows"]] == [9, 2]
    for row in result["rows"]:
        assert row["merged_ms"] > 0 and row["experts_ms"] > 0
        ratio = row["merged_ms"] / row["experts_ms"]
        assert row["reduction_pct"] == pytest.approx(100 * (1 - ratio))
        assert row["ideal_pct"] == pytest.approx(50.0)
        assert row["of_ideal"] == pytest.approx(row["reduction_pct"] / 50.0)
        per_second = 1000 * row["batch_size"] / row["merged_ms"]
        assert row["merged_texts_per_s"] == pytest.approx(per_second)
    lines = format_bench(result).splitlines()
    assert lines[0].split()[:2] == ["batch", "merged"] and len(lines) == 4
