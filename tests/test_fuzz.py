"""Property-based fuzzing: random architectures must pass every oracle at random ratios.

tests/fuzzgen.py draws architectures (conv, linear, norms, activations, add, mul, cat,
split/chunk, reshape into groups, attention, pooling) and ``run_case`` applies the oracles:
compact with verification, input untouched, output shapes at two batch sizes, ratio-0 identity,
dead-channel invariance and onnxruntime equality. CI runs a few dozen fixed (derandomised)
Hypothesis examples; ``python tools/fuzz.py --cases N`` runs long campaigns.

Every failure a fuzz run found is pinned below as a regression case (minimal spec, shrunk).
"""

from __future__ import annotations

import pytest

pytest.importorskip("hypothesis")

import fuzzgen  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CI_EXAMPLES = 40
SEEDED_CASES = 12  # plus the first cases of tools/fuzz.py's default run: bigger, more attention


def _report(res: fuzzgen.CaseResult) -> str:
    lines = [
        f"ratio={res.ratio} prune_hidden={res.prune_hidden} attention={res.attention} "
        f"spec={fuzzgen.spec_json(res.spec)}"
    ]
    lines += [f"  {f.oracle}: {f.error}\n{f.detail}" for f in res.failures]
    return "\n".join(lines)


@settings(
    max_examples=CI_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples in every CI run; tools/fuzz.py explores new ones
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
@given(
    spec=fuzzgen.specs(max_ops=4),
    ratio=st.sampled_from([0.2, 0.5, 0.8]),
    prune_hidden=st.booleans(),
    attention=st.sampled_from(["heads", "q_heads", "head_dim"]),
)
def test_random_architectures_pass_every_oracle(spec, ratio, prune_hidden, attention) -> None:
    res = fuzzgen.run_case(spec, ratio, prune_hidden, onnx=True, attention=attention)
    assert not res.failures, _report(res)


@pytest.mark.parametrize("seed", range(SEEDED_CASES))
def test_seeded_random_architectures_pass_every_oracle(seed: int) -> None:
    """The first cases of ``tools/fuzz.py --seed 0`` (same specs, ratios and prune_hidden)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    from fuzz import case_params

    ratio, prune_hidden = case_params(seed)
    res = fuzzgen.run_case(fuzzgen.random_spec(seed), ratio, prune_hidden, onnx=True)
    assert not res.failures, _report(res)


def _seq(ops: list[dict], **kw) -> dict:
    spec = {
        "kind": "seq",
        "in_ch": 8,
        "tokens": 3,
        "seed": 0,
        "ops": ops,
        "embed": "features",
        "cls_token": False,
        "pos_embed": False,
        "head": "mean_linear",
        "classes": 3,
    }
    return {**spec, **kw}


def _image(ops: list[dict], **kw) -> dict:
    spec = {"kind": "image", "in_ch": 3, "size": 4, "seed": 0, "ops": ops, "head": "gap_linear", "classes": 3}
    return {**spec, **kw}


# (id, spec, ratio, prune_hidden): failures found by tools/fuzz.py, kept passing forever
REGRESSIONS = [
    # q @ k^T of a single-head attention was pruned inside head_dim; the user's scale
    # head_dim ** -0.5 then changed with the head_dim attribute (caught by verify and by the
    # dead-channel oracle). Fixed in rules/attention.py: contractions of two activations keep
    # the contracted dim whole.
    (
        "single_head_manual_attention",
        _seq([{"op": "attn", "kind": "manual", "heads": 1, "pre_norm": False}]),
        0.5,
        False,
    ),
    # num_heads == head_dim == num_kv_heads == 2: the view constants (2, 2) -> (1, 2) made every
    # attribute holding 2 a candidate; the shape-only search accepted head_dim=1 (2 heads of
    # width 1: runs, wrong numbers; caught by verify). Fixed in surgery.attributes.choose_attr_updates: all
    # subsets of a small ambiguous set are tried and a choice must match the plan's reference.
    (
        "heads_equal_head_dim_sdpa",
        _seq([{"op": "attn", "kind": "sdpa", "heads": 2, "pre_norm": True}], in_ch=4),
        0.3,
        True,
    ),
    # one channel split off (x.split([1, C - 1])) into a Linear whose weight is (out, 1): the
    # weight's size-1 in-dim was unlabelled, so removing that channel left the weight unsliced
    # ("mat1 and mat2 shapes cannot be multiplied"). Fixed in rules/algebra.py: a labelled
    # size-1 dim meeting an unlabelled size-1 dim keeps its size.
    (
        "single_channel_split_into_linear",
        _seq([{"op": "group_scale", "groups": 4}, {"op": "split_lin", "first": 1, "out": 4}], seed=45252),
        0.5,
        True,
    ),
    # two ambiguous attribute sets (sdpa num_heads == head_dim == 2, MultiheadAttention 4 -> 1):
    # a choice that ran but computed wrong numbers sent the search to the other module, it never
    # came back, and the user got a batch-specialised GraphModule fallback. Fixed: a numeric
    # mismatch is located at the first differing layer (verify.first_mismatch).
    (
        "two_ambiguous_attention_modules",
        _seq(
            [
                {"op": "attn", "kind": "sdpa", "heads": 2, "pre_norm": True},
                {"op": "linear", "out": 4, "bias": False},
                {"op": "attn", "kind": "mha", "heads": 4, "pre_norm": False},
            ],
            in_ch=4,
            seed=25995,
        ),
        0.9,
        False,
    ),
    # GQA, 4 q heads of width 4, 2 kv heads, one kv group removed: num_heads 4 -> 2 (not
    # head_dim, also 4) and num_kv_heads 2 -> 1 must be chosen together; the one-set-at-a-time
    # walk missed the pair and returned a batch-specialised GraphModule. Fixed: the ambiguous
    # sets of one module are searched jointly (surgery.attributes._per_module).
    (
        "gqa_heads_equal_head_dim",
        _seq(
            [
                {"op": "linear", "out": 16, "bias": False},
                {"op": "attn", "kind": "gqa", "heads": 4, "pre_norm": False},
            ],
            in_ch=4,
            tokens=5,
            seed=65460,
        ),
        0.3,
        True,
    ),
    # x.split([self.first, C - self.first]) with equal parts [9, 9] -> [7, 8]: the attribute
    # holding 9 could become 7 or 8, so it was left unchanged and the user got a batch-specialised
    # GraphModule. Fixed in shapes.attribute_updates: every candidate becomes an uncertain update
    # chosen by running the model against the plan's reference.
    (
        "equal_split_sizes_change_differently",
        _seq(
            [{"op": "split_lin", "first": 6, "out": 16}, {"op": "split_lin", "first": 9, "out": 4}],
            tokens=5,
            seed=29844,
        ),
        0.2,
        False,
    ),
    # num_heads == head_dim == 2 with the hidden size pruned to one channel: the attribute choice
    # (num_heads or head_dim -> 1?) was judged against the reference at 1e-4, and on nearly uniform
    # attention the wrong one (two heads of width 1) stayed within 4e-5. Found once verify held
    # small models to their own float32 rounding error; the choice now uses that tolerance too.
    (
        "heads_equal_head_dim_with_pruned_hidden",
        _seq(
            [{"op": "attn", "kind": "sdpa", "heads": 2, "pre_norm": False}],
            in_ch=4, tokens=5, seed=33197, pos_embed=True,
        ),
        0.9,
        True,
    ),
    (
        "mha_then_rms_with_pruned_hidden",
        _seq(
            [
                {"op": "linear", "out": 4, "bias": False},
                {"op": "attn", "kind": "mha", "heads": 2, "pre_norm": False},
                {"op": "rms"},
                {"op": "rms"},
            ],
            seed=9199, cls_token=True, pos_embed=True,
        ),
        0.9,
        True,
    ),
    # Manual attention (qkv reshaped by num_heads and head_dim, both 4): 4 -> 2 could be either
    # attribute. num_heads=4, head_dim=2 splits every kept head in two; with near-uniform
    # softmaxes the model's outputs still matched (later layers damped the error), so the
    # attribute choice took it and verify's block check then refused the model (relative error
    # 1.5e-5 in the block). Found by tools/fuzz.py --seed 71000 (case 71098, dead-channel
    # oracle). Fixed in surgery/attributes.py: a trial must also match in every recorded layer.
    (
        "manual_attention_heads_split_hidden_by_later_layers",
        _seq(
            [
                {"op": "linear", "out": 12, "bias": True},
                {"op": "linear", "out": 16, "bias": True},
                {"op": "linear", "out": 16, "bias": True},
                {"op": "attn", "kind": "manual", "heads": 4, "pre_norm": False},
                {"op": "cat_lin", "parts": [4, 16]},
                {"op": "act", "fn": "sigmoid"},
                {"op": "mlp_res", "hidden": 4, "fn": "tanh"},
                {"op": "attn", "kind": "sdpa", "heads": 1, "pre_norm": True},
            ],
            in_ch=12, seed=45375, cls_token=True, pos_embed=True, head="cls_linear",
        ),
        0.5,
        False,
    ),
]


@pytest.mark.parametrize(
    ("spec", "ratio", "prune_hidden"), [r[1:] for r in REGRESSIONS], ids=[r[0] for r in REGRESSIONS]
)
def test_fuzz_regression(spec, ratio, prune_hidden) -> None:
    res = fuzzgen.run_case(spec, ratio, prune_hidden, onnx=True)
    assert not res.failures, _report(res)


def test_generator_covers_the_building_blocks() -> None:
    """The random generator really produces every op family (a generator stuck on convs tests little)."""
    seen: set[str] = set()
    for seed in range(300):
        spec = fuzzgen.random_spec(seed)
        stack = list(spec["ops"])
        while stack:
            op = stack.pop()
            seen.add(op["op"] + (f":{op['kind']}" if op["op"] == "attn" else ""))
            stack.extend(op.get("body", []))
    expected = (
        set(fuzzgen.IMAGE_OPS) | (set(fuzzgen.SEQ_OPS) - {"attn"}) | {f"attn:{k}" for k in fuzzgen.ATTN_KINDS}
    )
    assert expected <= seen, f"never generated: {sorted(expected - seen)}"


def test_every_generated_architecture_builds_and_runs() -> None:
    for seed in range(40):
        spec = fuzzgen.random_spec(seed)
        model, x = fuzzgen.build(spec)
        model(x)
