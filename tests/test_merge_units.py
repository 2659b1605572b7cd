"""The merge engine's small rules on their own (no model files): output dtypes, base tensor
names, per-tensor random streams, task-vector norms and the implausible-expert warning."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from hm3.engine import TaskVectorSquares, TensorJob, task_vector_norms, warn_implausible
from hm3.engine.plan import _base_name
from hm3.engine.stream import _generator
from hm3.engine.write import IMPLAUSIBLE_TASK_VECTOR, _output_dtype
from hm3.errors import Hm3Warning


def _sources(stored: str):
    return SimpleNamespace(experts=[SimpleNamespace(dtype=lambda _name: stored)])


@pytest.mark.parametrize("stored, recipe_dtype, floating, expected", [
    ("F32", None, True, torch.float32),
    ("F16", None, True, torch.float16),      # half precision stays as stored
    ("BF16", None, True, torch.bfloat16),
    ("F64", None, True, torch.float32),      # anything else is written as float32
    ("F32", "float16", True, torch.float16),  # the recipe's dtype wins for floating tensors
    ("BF16", "float32", True, torch.float32),
    ("F16", "bfloat16", True, torch.bfloat16),
    ("I64", "float16", False, torch.int64),  # integer buffers keep their type
    ("BOOL", None, False, torch.bool),
])
def test_output_dtype(stored, recipe_dtype, floating, expected):
    job = TensorJob("t", (2,), "t", None, floating)
    got = _output_dtype(SimpleNamespace(dtype=recipe_dtype), _sources(stored), job)
    assert got == expected


def test_base_name_is_the_same_name_or_without_the_task_models_prefix():
    base = {"encoder.layer.0.weight", "embeddings.word_embeddings.weight",
            "bert.pooler.dense.weight"}
    assert _base_name(base, "encoder.layer.0.weight") == "encoder.layer.0.weight"
    assert _base_name(base, "bert.encoder.layer.0.weight") == "encoder.layer.0.weight"
    assert _base_name(base, "bert.pooler.dense.weight") == "bert.pooler.dense.weight"
    assert _base_name(base, "classifier.weight") is None
    assert _base_name(base, "roberta.bert.encoder.layer.0.weight") is None  # one prefix only


def _draws(seed, tensor, expert):
    return torch.rand(8, generator=_generator(seed, tensor, expert)).tolist()


def test_every_seed_tensor_and_expert_has_its_own_reproducible_stream():
    first = _draws(0, "a.weight", 0)
    assert _draws(0, "a.weight", 0) == first
    others = [_draws(1, "a.weight", 0), _draws(0, "b.weight", 0), _draws(0, "a.weight", 1),
              _draws(10, "a.weight", 0), _draws(0, "a.weight0", 0)]
    assert all(other != first for other in others)
    assert len({tuple(d) for d in others}) == len(others)


def test_task_vector_norms_are_relative_to_the_base():
    sources = SimpleNamespace(recipe=SimpleNamespace(experts=[SimpleNamespace(task="a"),
                                                              SimpleNamespace(task="b")]))
    norms = task_vector_norms(sources, TaskVectorSquares([4.0, 1e-14], [16.0, 0.0]))
    assert norms == {"a": pytest.approx(0.5), "b": pytest.approx(0.1)}  # sqrt(1e-14 / 1e-12)


def test_implausible_experts_are_warned_about_above_half_the_bases_norm():
    assert IMPLAUSIBLE_TASK_VECTOR == 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_implausible({"close": 0.5, "near": 0.01})
    with pytest.warns(Hm3Warning) as caught:
        warn_implausible({"fine": 0.1, "far": 0.73, "farther": 2.0})
    assert [str(w.message) for w in caught] == [
        "expert far's weights differ from the base by 73% of the base's norm; it was probably "
        "not fine-tuned from this base",
        "expert farther's weights differ from the base by 200% of the base's norm; it was "
        "probably not fine-tuned from this base"]


def test_tensors_are_read_from_the_file_as_safetensors_stores_them(tmp_path):
    from safetensors.torch import save_file

    from hm3.checkpoint import Checkpoint

    stored = {"w": torch.randn(7, 5), "half": torch.randn(3, 4).half(),
              "brain": torch.randn(6).bfloat16(), "ids": torch.arange(9, dtype=torch.int64),
              "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}
    save_file(stored, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    ckpt = Checkpoint(str(tmp_path))
    for name, want in stored.items():
        got = ckpt.tensor(name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), name
    got = ckpt.tensor("w")
    got.add_(1)  # memory of its own: writing to it changes neither the file nor the next read
    assert torch.equal(ckpt.tensor("w"), stored["w"])


def test_a_file_cut_inside_a_tensor_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    from hm3.checkpoint import Checkpoint
    from hm3.errors import Hm3Error

    save_file({"a": torch.ones(4), "b": torch.ones(1000)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    ckpt = Checkpoint(str(tmp_path))  # opened whole, then cut: as a file being replaced would be
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(Hm3Error, match="cannot read tensor b .*ends inside tensor b"):
        ckpt.tensor("b")


def test_the_public_merge_is_the_function_and_the_engine_a_package_beside_it():
    import hm3
    import hm3.engine
    from hm3 import merge
    from hm3.pipeline import merge as pipeline_merge

    assert merge is hm3.merge is pipeline_merge
    assert callable(hm3.engine.open_sources) and callable(hm3.engine.write_model)


def test_task_vector_squares_add_up_per_expert():
    squares = TaskVectorSquares.zeros(2)
    squares.add(1, 2.0, 8.0)
    squares.add(1, 0.5, 1.0)
    assert squares == TaskVectorSquares([0.0, 2.5], [0.0, 9.0])


def test_parts_of_a_tensor_are_read_into_the_callers_buffer_converted(tmp_path):
    from safetensors.torch import save_file

    from hm3.checkpoint import Checkpoint

    stored = {"w": torch.randn(7, 5), "brain": torch.randn(6, 4).bfloat16()}
    (tmp_path / "safe").mkdir()
    save_file(stored, tmp_path / "safe" / "model.safetensors")
    (tmp_path / "pickled").mkdir()
    torch.save({k: v.t().contiguous().t() for k, v in stored.items()},  # not contiguous
               tmp_path / "pickled" / "pytorch_model.bin")
    for folder in ("safe", "pickled"):
        (tmp_path / folder / "config.json").write_text("{}")
    for ckpt in (Checkpoint(str(tmp_path / "safe")),
                 Checkpoint(str(tmp_path / "pickled"), allow_pickle=True)):
        for _ in ("from the file", "preloaded"):
            buffer = torch.full((9,), -1.0)
            for name, want in stored.items():
                flat = want.float().reshape(-1)
                for start in (0, 4, flat.numel() - 9):
                    got = ckpt.read_into(name, buffer, start)
                    assert got.data_ptr() == buffer.data_ptr()
                    assert torch.equal(got, flat[start:start + 9]), (ckpt.path, name, start)
            ckpt.preload()
    with pytest.raises(ValueError, match="has 35 entries"):
        Checkpoint(str(tmp_path / "safe")).read_into("w", torch.empty(9), 30)


def test_a_weighted_sum_in_parts_equals_it_whole(monkeypatch, tmp_path):
    """linear and task arithmetic run CHUNK entries at a time: any chunk size, the same bits."""
    from hm3 import merge, parse_recipe
    from hm3.checkpoint import Checkpoint
    from hm3.engine import stream

    from conftest import build_family, recipe_dict

    base, experts = build_family(tmp_path / "models", {"a": ["x", "y"], "b": ["u", "v", "w"]},
                                 tokenizer=False)
    default = stream.CHUNK
    for method in ("linear", "task_arithmetic"):
        outs = []
        for chunk in (default, 7):
            monkeypatch.setattr(stream, "CHUNK", chunk)
            recipe = recipe_dict(base, experts, method)
            recipe["experts"][1]["weight"] = 0.7
            outs.append(tmp_path / f"{method}-{chunk}")
            merge(parse_recipe(recipe), outs[-1], progress=False)
        whole, parts = (Checkpoint(str(out)) for out in outs)
        for name in whole.keys():
            assert torch.equal(whole.tensor(name), parts.tensor(name)), (method, name)
