"""Shared pytest set-up: importable test helpers and deterministic, single-threaded torch.

The one-compaction-per-model cache and the generic oracle tests live in ``oracles.py``
(``oracles.compacted`` and ``oracles.OracleSuite``), next to the oracles they run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # `import oracles` under any pytest import mode

# The test models are tiny: intra-op threads cannot speed them up, and on a busy 2-core machine
# they slow every conv down 10-100x (measured: a tiny MobileNetV2 forward takes 2.5 ms on one
# thread, 1 s on two while another process keeps the cores busy).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    """Same random numbers in every test, whatever ran before it."""
    torch.manual_seed(0)
