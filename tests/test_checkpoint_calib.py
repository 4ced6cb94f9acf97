"""Reconstruction at checkpoint scale: ``compact_checkpoint(src, dst, ratio, data=calib)``.

Oracle: the folder equals ``graphprune.compact(from_pretrained(src), x, ratio, data=calib)``
(the whole-model reconstruction): same plan, same added biases, same tensors and logits within
float tolerance. Memory: the weight bytes alive at once (weak references to every tensor read
or copied) stay at one block's original and working copy, well under the model's weights.
Bad data and unsupported options leave nothing in dst's parent.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import graphprune
from graphprune.cli import commands as cli
from graphprune.errors import InputError

transformers = pytest.importorskip("transformers")
VOCAB = 96


def _llama() -> torch.nn.Module:
    torch.manual_seed(5)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


def _calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, VOCAB, (2, 10), generator=g) for _ in range(2)]


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("calib") / "src"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _llama().save_pretrained(folder, max_shard_size="30KB")
    assert len(list(folder.glob("*.safetensors"))) > 2
    return folder


@pytest.fixture(scope="module")
def calibrated(src, tmp_path_factory):
    dst = tmp_path_factory.mktemp("out") / "dst"
    return graphprune.compact_checkpoint(src, dst, 0.5, data=_calib(), progress=False)


def _folder(dst: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(dst.glob("*.safetensors")) for k, v in load_file(f).items()}


def _load(dst: Path, config) -> torch.nn.Module:
    base = transformers.LlamaForCausalLM(config).eval()
    small = graphprune.apply_plan(base, graphprune.Plan.from_json((dst / "graphprune_plan.json").read_text()))
    missing, unexpected = small.load_state_dict(_folder(dst), strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return small


def test_checkpoint_reconstruction_equals_compact_of_the_loaded_model(src, calibrated):
    loaded = transformers.LlamaForCausalLM.from_pretrained(src).eval()
    calib = _calib()
    expected, plan = graphprune.compact_with_plan(loaded, calib[0][:1], 0.5, data=calib)
    got = calibrated.plan
    assert got.slices == plan.slices and got.biases == plan.biases
    assert plan.biases, "reconstruction compensated no bias: the oracle would not see the refit"
    assert not calibrated.config_updated  # the added biases: loaded with the plan, not the config
    files, want = _folder(calibrated.path), expected.state_dict()
    assert set(files) == set(want)
    for k, v in files.items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6, msg=k)
    small = _load(calibrated.path, loaded.config)
    plain = graphprune.compact(loaded, calib[0][:1], 0.5, importance="l2")
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ours, theirs = small(input_ids=ids).logits, expected(input_ids=ids).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(ours, plain(input_ids=ids).logits, atol=1e-3)  # it did refit


def test_checkpoint_reconstruction_holds_one_block_at_a_time(src, calibrated):
    model = _llama()
    blocks = [sum(p.numel() * p.element_size() for p in b.parameters()) for b in model.model.layers]
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    linears = [m for m in model.model.layers[0].modules() if isinstance(m, torch.nn.Linear)]
    biases = 2 * 4 * sum(m.out_features for m in linears)  # the zero biases added, fp32, both copies
    assert calibrated.peak_resident_bytes > 0
    assert calibrated.peak_resident_bytes <= 2 * max(blocks) + biases  # original + working copy
    assert calibrated.peak_resident_bytes < total - max(blocks)  # never the whole model


def test_checkpoint_cli_calib_file_gives_the_same_folder(src, calibrated, tmp_path, capsys):
    calib = tmp_path / "calib.pt"
    torch.save(torch.cat(_calib()), calib)
    dst = tmp_path / "cli"
    argv = ["checkpoint", str(src), str(dst), "--ratio", "0.5", "--calib", str(calib), "--calib-batch", "2"]
    assert cli.main([*argv, "--quiet"]) == 0
    assert "graphprune_plan.json" in capsys.readouterr().out
    a, b = _folder(dst), _folder(calibrated.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_activation_criterion_measured_block_by_block_equals_compact(src, tmp_path):
    """importance='activation' with data: the statistics come from one block at a time on the
    original activations; plan and tensors equal compact's on the loaded model (plain slicing, so
    bit-identical and config.json updated), and the plan is not the weight plan."""
    calib = _calib()
    result = graphprune.compact_checkpoint(src, tmp_path / "act", 0.5, data=calib, importance="activation",
                                           progress=False)
    loaded = transformers.LlamaForCausalLM.from_pretrained(src).eval()
    expected, plan = graphprune.compact_with_plan(loaded, calib[0][:1], 0.5, data=calib,
                                                  importance="activation")
    assert result.plan.slices == plan.slices
    assert plan.slices != graphprune.make_plan(loaded, calib[0][:1], 0.5, importance="l2").slices
    got = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "act").state_dict()
    want = expected.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    block = sum(p.numel() * p.element_size() for p in loaded.model.layers[0].parameters())
    assert 0 < result.peak_resident_bytes <= block  # the original block only: nothing is refit


@pytest.mark.parametrize("bad, match", [
    ([torch.rand(2, 10)], "does not fit the model"),  # float ids
    ([torch.full((2, 10), VOCAB + 3)], "does not fit the model"),  # ids past the vocabulary
    ([torch.zeros(2, 10, 4, dtype=torch.long)], "does not match"),  # another rank than the example
    ([], "no batches"),
])
def test_checkpoint_bad_calibration_data_is_clear_and_writes_nothing(src, tmp_path, bad, match):
    with pytest.raises(InputError, match=match):
        graphprune.compact_checkpoint(src, tmp_path / "dst", 0.5, data=bad, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_reconstruction_refuses_groups_that_span_blocks(src, tmp_path):
    with pytest.raises(InputError, match="spans several blocks"):
        graphprune.compact_checkpoint(src, tmp_path / "dst", 0.5, data=_calib(), prune_hidden=True,
                                      progress=False)
    assert list(tmp_path.iterdir()) == []
