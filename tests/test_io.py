"""graphprune.save / graphprune.load: JSON plan + safetensors, replayed on a fresh base model.

Round trips must give bit-identical outputs (the oracle is the compact model before saving);
a plan or weights that do not fit the base model must be rejected with PlanMismatchError; the
saved directory holds no pickle and loading never unpickles.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from oracles import assert_untouched, compare_outputs, snapshot
from torch import nn

import graphprune
from graphprune import zoo
from graphprune.graph.inputs import flatten_outputs, run_model


def _outputs(model: nn.Module, x) -> list[torch.Tensor]:
    return flatten_outputs(run_model(model, x))


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    model, x = zoo.build("resnet18")
    small, plan = graphprune.compact_with_plan(model, x, ratio=0.4)
    directory = tmp_path_factory.mktemp("resnet")
    graphprune.save(small, directory, plan)
    return model, x, small, plan, directory


def _gpt2(seed: int):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, tie_word_embeddings=True)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_cnn_round_trip_gives_identical_outputs_on_a_freshly_built_base(resnet) -> None:
    _, x, small, _, directory = resnet
    base = zoo.build("resnet18", seed=7)[0]  # same architecture, different weights
    before = snapshot(base)
    loaded = graphprune.load(directory, base, example_input=x)
    assert type(loaded) is type(small)
    compare_outputs(_outputs(loaded, x), _outputs(small, x), 0.0, "loaded vs saved compact model")
    assert graphprune.count_params(loaded) == graphprune.count_params(small)
    assert_untouched(base, before)


@pytest.mark.parametrize("prune_hidden", [False, True])
def test_hf_round_trip_keeps_tied_weights_outputs_and_config(tmp_path: Path, prune_hidden: bool) -> None:
    model = _gpt2(0)
    x = {"input_ids": torch.randint(0, 64, (2, 8))}
    small, plan = graphprune.compact_with_plan(model, x, ratio=0.5, prune_hidden=prune_hidden)
    graphprune.save(small, tmp_path, plan)
    assert (tmp_path / "config.json").is_file()
    loaded = graphprune.load(tmp_path, _gpt2(1), example_input=x)
    compare_outputs(_outputs(loaded, x), _outputs(small, x), 0.0, "loaded vs saved GPT-2")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight, "tied embedding came back untied"
    assert loaded.config.to_dict() == small.config.to_dict(), "the loaded config does not describe the model"
    if prune_hidden:
        assert loaded.config.n_embd == loaded.transformer.wte.weight.shape[1] < model.config.n_embd


def test_saved_directory_holds_only_json_and_safetensors(resnet) -> None:
    directory = resnet[4]
    files = sorted(p.name for p in Path(directory).iterdir())
    assert files == ["graphprune.json", "model.safetensors", "plan.json"]
    for name in ("graphprune.json", "plan.json"):
        json.loads((Path(directory) / name).read_text())
    head = (Path(directory) / "model.safetensors").read_bytes()[:16]
    assert not head.startswith(b"\x80"), "weights file looks like a pickle"


def test_load_never_unpickles(resnet, monkeypatch) -> None:
    _, x, small, _, directory = resnet

    def refuse(*args, **kwargs):
        raise AssertionError("graphprune.load unpickled something")

    for target, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(target, name, refuse)
    loaded = graphprune.load(directory, zoo.build("resnet18", seed=3)[0])
    compare_outputs(_outputs(loaded, x), _outputs(small, x), 0.0, "loaded without pickle")


def test_plain_torch_save_of_the_compact_model_loads_and_runs(resnet, tmp_path: Path) -> None:
    _, x, small, _, _ = resnet
    path = tmp_path / "small.pt"
    torch.save(small, path)
    again = torch.load(path, weights_only=False)
    compare_outputs(_outputs(again, x), _outputs(small, x), 0.0, "torch.save round trip")


def test_plan_for_another_configuration_is_rejected(resnet) -> None:
    directory = resnet[4]
    wider = zoo.build("resnet18", size="bench")[0]  # same class, other widths
    with pytest.raises(graphprune.PlanMismatchError, match="shape"):
        graphprune.load(directory, wider)


def test_plan_for_another_architecture_is_rejected(resnet) -> None:
    with pytest.raises(graphprune.PlanMismatchError, match="no such tensor"):
        graphprune.load(resnet[4], zoo.build("vgg")[0])


def _copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for p in Path(src).iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_tampered_plan_attribute_is_rejected(tmp_path: Path) -> None:
    """A plan may only change integer sizes that exist with the expected value."""
    model = _gpt2(0)
    x = {"input_ids": torch.randint(0, 64, (2, 8))}
    small, plan = graphprune.compact_with_plan(model, x, ratio=0.5)
    sizes = ("in_features", "out_features", "normalized_shape")
    custom = [u for u in plan.attr_updates if u.attr not in sizes]
    assert custom, "expected attribute updates beyond module sizes (num_heads, split_size...)"
    graphprune.save(small, tmp_path / "ok", plan)
    for field, value, message in (
        ("new", "os.system('echo hi')", "expected an integer"),
        ("old", 12345, "expects"),
        ("module", "no.such.module", "no module"),
    ):
        d = _copy_dir(tmp_path / "ok", tmp_path / field)
        data = json.loads((d / "plan.json").read_text())
        entry = next(a for a in data["attr_updates"] if a["attr"] == custom[0].attr)
        entry[field] = value
        (d / "plan.json").write_text(json.dumps(data))
        with pytest.raises(graphprune.PlanMismatchError, match=message):
            graphprune.load(d, _gpt2(1))


def test_weights_from_another_plan_are_rejected(resnet, tmp_path: Path) -> None:
    model, x, _, _, directory = resnet
    other, other_plan = graphprune.compact_with_plan(model, x, ratio=0.2)
    graphprune.save(other, tmp_path / "other", other_plan)
    mixed = _copy_dir(directory, tmp_path / "mixed")
    (mixed / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(graphprune.PlanMismatchError, match="weights"):
        graphprune.load(mixed, zoo.build("resnet18")[0])


def test_saving_a_model_with_a_plan_that_did_not_make_it_is_rejected(resnet, tmp_path: Path) -> None:
    model, x, small, _, _ = resnet
    other_plan = graphprune.make_plan(model, x, ratio=0.2, round_to=1)  # exact: other widths than 0.4
    with pytest.raises(graphprune.PlanMismatchError, match="did not make this model"):
        graphprune.save(small, tmp_path, other_plan)


def test_loading_something_that_is_not_a_save_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(graphprune.GraphPruneError, match="graphprune.save"):
        graphprune.load(tmp_path, zoo.build("resnet18")[0])
