"""Saved files are data: load accepts only what graphprune.save writes, and says what is wrong.

Each test tampers with one piece of a real save directory (a conv's padding slipped into the
plan, a plan file whose text is a path to another save, malformed JSON of every shape, swapped
or extra tensors, links) and expects a PlanMismatchError that names it; the untampered
directory must load to the saved model's exact outputs (the oracle that the refusals are not
just refusing everything).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import graphprune
from graphprune.planning.plan import AttrUpdate


class Net(nn.Module):
    """Convs whose padding/stride/dilation a tampered plan could change, plus a non-persistent buffer."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)
        self.register_buffer("gain", torch.rand(8) + 0.5, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h)) * self.gain[:, None, None]
        return self.head(h.mean((2, 3)))


X = torch.randn(2, 3, 8, 8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = Net(0)
    small, plan = graphprune.compact_with_plan(model, X, ratio=0.5)
    directory = tmp_path_factory.mktemp("saved")
    graphprune.save(small, directory, plan)
    return small, directory


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _edit_plan(saved, tmp_path: Path, edit) -> Path:
    d = _copy(saved[1], tmp_path / "edited")
    data = json.loads((d / "plan.json").read_text())
    edit(data)
    (d / "plan.json").write_text(json.dumps(data))
    return d


def test_untampered_save_loads_to_the_saved_outputs_even_on_a_base_with_other_buffers(saved) -> None:
    small, directory = saved
    loaded = graphprune.load(directory, Net(seed=3), example_input=X)  # other weights and gain
    with torch.no_grad():
        assert torch.equal(loaded(X), small(X))


@pytest.mark.parametrize(
    ("attr", "old", "new"),
    [("padding", [1, 1], [0, 0]), ("stride", [1, 1], [2, 2]), ("dilation", [1, 1], [2, 2]),
     ("kernel_size", [3, 3], [1, 1])],
)
def test_plan_changing_a_conv_hyperparameter_is_refused(saved, tmp_path: Path, attr, old, new) -> None:
    d = _edit_plan(saved, tmp_path, lambda p: p["attr_updates"].append(
        {"module": "conv2", "attr": attr, "old": old, "new": new}))
    with pytest.raises(graphprune.PlanMismatchError, match=attr):
        graphprune.load(d, Net(1))


def test_plan_size_attribute_that_its_slices_do_not_imply_is_refused(saved, tmp_path: Path) -> None:
    def edit(p):
        p["attr_updates"] = [a for a in p["attr_updates"] if a["attr"] != "out_channels"]
        p["attr_updates"].append({"module": "conv1", "attr": "out_channels", "old": 8, "new": 5})

    with pytest.raises(graphprune.PlanMismatchError, match="out_channels"):
        graphprune.load(_edit_plan(saved, tmp_path, edit), Net(1))


def test_plan_integer_attribute_of_a_custom_module_must_follow_a_slice(saved, tmp_path: Path) -> None:
    """An int attribute of the user's own module (a head count, say) may only shrink like a slice."""
    base = Net(1)
    base.groups_of_four = 8  # an integer the engine could legitimately shrink 8 -> 4
    ok = _edit_plan(saved, tmp_path / "ok", lambda p: p["attr_updates"].append(
        {"module": "", "attr": "groups_of_four", "old": 8, "new": 4}))
    assert graphprune.load(ok, base).groups_of_four == 4  # conv2 kept 4 of 8: implied
    bad = _edit_plan(saved, tmp_path / "bad", lambda p: p["attr_updates"].append(
        {"module": "", "attr": "groups_of_four", "old": 8, "new": 3}))
    with pytest.raises(graphprune.PlanMismatchError, match="groups_of_four"):
        graphprune.load(bad, base)


def test_plan_text_that_is_a_path_to_another_plan_is_not_followed(saved, tmp_path: Path) -> None:
    d = _copy(saved[1], tmp_path / "redirect")
    (d / "plan.json").write_text(str(saved[1] / "plan.json"))
    with pytest.raises(graphprune.PlanMismatchError, match="not valid JSON"):
        graphprune.load(d, Net(1))
    with pytest.raises(graphprune.PlanMismatchError, match="not valid JSON"):
        graphprune.Plan.from_json(d / "plan.json")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "array, not a plan object"),
        ('"just a string"', "not a plan object"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"format": "graphprune-plan/2", "ratio": 0.5, "importance": "l2", "slices": {}}', "format"),
        ('{"format": "graphprune-plan/1", "ratio": 0.5, "importance": "l2"}', "'slices' is missing"),
        ('{"format": "graphprune-plan/1", "ratio": 0.5, "importance": "l2", "slices": []}', "slices"),
        ('{"format": "graphprune-plan/1", "ratio": "x", "importance": "l2", "slices": {}}', "ratio"),
        ('{"format": "graphprune-plan/1", "ratio": 0.5, "importance": "l2", '
         '"slices": {"conv1.weight": {"0": ["a"]}}}', "integer"),
        ('{"format": "graphprune-plan/1", "ratio": 0.5, "importance": "l2", "slices": {}, '
         '"attr_updates": [{"module": "", "attr": "x"}]}', "attr_updates"),
        ('{"format": "graphprune-plan/1", "ratio": 0.5, "importance": "l2", "slices": {}, '
         '"scales": [{"tensor": "conv1.weight", "dim": 0, "index": [0], "factor": 7.0}]}', "factor"),
        ("{not json", "not valid JSON"),
    ],
)
def test_malformed_plan_is_a_plan_mismatch_error_that_says_what(saved, tmp_path: Path, text, message) -> None:
    d = _copy(saved[1], tmp_path / "bad")
    (d / "plan.json").write_text(text)
    with pytest.raises(graphprune.PlanMismatchError, match=message) as info:
        graphprune.load(d, Net(1))
    assert "has no plan.json" not in str(info.value)
    with pytest.raises(graphprune.PlanMismatchError, match=message):
        graphprune.Plan.from_json(text)


def test_missing_plan_file_says_so(saved, tmp_path: Path) -> None:
    d = _copy(saved[1], tmp_path / "noplan")
    (d / "plan.json").unlink()
    with pytest.raises(graphprune.GraphPruneError, match="has no plan.json"):
        graphprune.load(d, Net(1))


def test_tampered_rescale_factor_is_refused(saved, tmp_path: Path) -> None:
    d = _edit_plan(saved, tmp_path, lambda p: p["scales"].append(
        {"tensor": "conv1.weight", "dim": 0, "index": [0], "factor": 0.5}))
    with pytest.raises(graphprune.PlanMismatchError, match="rescale"):
        graphprune.load(d, Net(1))


def test_save_without_non_persistent_buffers_is_refused(saved, tmp_path: Path) -> None:
    """A directory missing the buffers file (tampered, or an older save) must not take the base's."""
    d = _copy(saved[1], tmp_path / "nobuf")
    (d / "buffers.safetensors").unlink()
    manifest = json.loads((d / "graphprune.json").read_text())
    manifest["files"].pop("buffers")
    (d / "graphprune.json").write_text(json.dumps(manifest))
    with pytest.raises(graphprune.PlanMismatchError, match="gain"):
        graphprune.load(d, Net(1))


def test_weights_file_with_an_extra_missing_or_reshaped_tensor_is_refused(saved, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(saved[1] / "model.safetensors"))
    for what, edit in (
        ("extra", lambda s: {**s, "smuggled": torch.zeros(3)}),
        ("missing", lambda s: {k: v for k, v in s.items() if k != "head.bias"}),
        ("reshaped", lambda s: {**s, "head.bias": torch.zeros(5)}),
        ("retyped", lambda s: {**s, "head.bias": s["head.bias"].to(torch.int32)}),
    ):
        d = _copy(saved[1], tmp_path / what)
        save_file(edit(dict(state)), str(d / "model.safetensors"), metadata={"format": "graphprune-saved/1"})
        with pytest.raises(graphprune.PlanMismatchError, match="weights"):
            graphprune.load(d, Net(1))


def test_linked_files_in_a_save_directory_are_refused(saved, tmp_path: Path) -> None:
    d = _copy(saved[1], tmp_path / "linked")
    (d / "plan.json").unlink()
    (d / "plan.json").symlink_to(saved[1] / "plan.json")
    with pytest.raises(graphprune.PlanMismatchError, match="link"):
        graphprune.load(d, Net(1))


def test_apply_plan_refuses_the_same_tampering(saved) -> None:
    plan = graphprune.Plan.from_json(saved[1] / "plan.json")
    assert graphprune.apply_plan(Net(1), plan).conv1.out_channels == saved[0].conv1.out_channels
    plan.attr_updates.append(AttrUpdate("conv2", "padding", (1, 1), (0, 0)))
    with pytest.raises(graphprune.PlanMismatchError, match="padding"):
        graphprune.apply_plan(Net(1), plan)


def test_user_module_attribute_named_like_a_torch_size_is_replayed(tmp_path: Path) -> None:
    """A user's ``self.groups`` (fed to a reshape) is a plan update of its own, not a Conv's derived
    size: load and apply_plan used to skip it, leaving a model that cannot run (fuzz case)."""
    from fuzzgen import build
    from test_fuzz import _seq

    spec = _seq([{"op": "group_scale", "groups": 4}, {"op": "split_lin", "first": 1, "out": 4}], seed=45252)
    model, x = build(spec)
    small, plan = graphprune.compact_with_plan(model, x, ratio=0.5, prune_hidden=True)
    assert any(u.attr == "groups" for u in plan.attr_updates)
    graphprune.save(small, tmp_path, plan)
    for rebuilt in (graphprune.load(tmp_path, build(spec)[0], example_input=x),
                    graphprune.apply_plan(build(spec)[0], plan)):
        rebuilt.load_state_dict(small.state_dict())
        with torch.no_grad():
            assert torch.equal(rebuilt(x), small(x))


def test_nan_in_the_saved_weights_is_refused_and_never_saved(saved, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(saved[1] / "model.safetensors"))
    state["conv2.weight"][0, 0, 0, 0] = float("nan")
    d = _copy(saved[1], tmp_path / "nan")
    save_file(state, str(d / "model.safetensors"), metadata={"format": "graphprune-saved/1"})
    with pytest.raises(graphprune.PlanMismatchError, match=r"NaN or Inf in conv2\.weight"):
        graphprune.load(d, Net(1))
    small = Net(0)
    with torch.no_grad():
        small.head.bias[0] = float("inf")
    plan = graphprune.Plan.from_json(saved[1] / "plan.json")
    with pytest.raises(graphprune.InputError, match="NaN or Inf in head.bias"):
        graphprune.save(graphprune.apply_plan(small, plan), tmp_path / "inf", plan)
