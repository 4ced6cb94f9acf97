"""compact() on Hugging Face transformers CNNs built from tiny configs with random weights.

These are code graphprune has never seen: HF's own module classes, keyword input
(``pixel_values=...``) and ``ModelOutput`` results. Skipped when transformers is not installed.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from oracles import (  # noqa: E402
    assert_untouched,
    check_dead_channels,
    check_onnx,
    check_ratio_zero_identity,
    check_shape_params_flops,
)

from graphprune import zoo  # noqa: E402

MODELS = list(zoo.HF_CNN_NAMES)
RATIO = 0.3


@pytest.mark.parametrize("name", MODELS)
def test_ratio_zero_gives_bit_identical_outputs(name: str) -> None:
    model, x = zoo.build(name)
    check_ratio_zero_identity(model, x)


@pytest.mark.parametrize("name", MODELS)
def test_removing_exactly_dead_channels_leaves_outputs_unchanged(name: str) -> None:
    model, x = zoo.build(name)
    check_dead_channels(model, x, RATIO)


@pytest.mark.parametrize("name", MODELS)
def test_input_model_is_bit_identical_after_compact(name: str, compacted) -> None:
    c = compacted(name, RATIO)
    assert_untouched(c.model, c.before)


@pytest.mark.parametrize("name", MODELS)
def test_compact_keeps_output_shapes_and_cuts_params_and_flops(name: str, compacted) -> None:
    c = compacted(name, RATIO)
    check_shape_params_flops(c.model, c.small, c.example_input)


@pytest.mark.parametrize("name", MODELS)
def test_compact_model_is_the_users_class(name: str, compacted) -> None:
    c = compacted(name, RATIO)
    assert type(c.small) is type(c.model), (
        f"compact returned {type(c.small).__name__}, expected the user's {type(c.model).__name__}"
    )


@pytest.mark.parametrize("name", MODELS)
def test_onnx_export_matches_compact_model_in_onnxruntime(name: str, compacted) -> None:
    c = compacted(name, RATIO)
    check_onnx(c.small, c.example_input)
