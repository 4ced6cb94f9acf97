"""compact() on Hugging Face transformers CNNs built from tiny configs with random weights.

These are code graphprune has never seen: HF's own module classes, keyword input
(``pixel_values=...``) and ``ModelOutput`` results. Every model gets the generic oracles
(``oracles.OracleSuite``). Skipped when transformers is not installed.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from oracles import OracleSuite  # noqa: E402

from graphprune import zoo  # noqa: E402


@pytest.mark.parametrize("name", list(zoo.HF_CNN_NAMES))
class TestGenericOracles(OracleSuite):
    build = zoo.build
    ratio = 0.3
