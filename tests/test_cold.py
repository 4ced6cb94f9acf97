"""A cold first call stays cheap: what compact imports and computes on the way (issue 17).

Timing itself is measured by tools/cold_time.py (next to Torch-Pruning); these tests pin the
pieces that make it fast without weakening anything: the numpy union-find labels components
exactly as scipy did, and importing graphprune does not import scipy (0.4 s of a cold call).
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from graphprune.graph.analysis import union_find


def _scipy_labels(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def test_union_find_labels_components_like_scipy() -> None:
    rng = np.random.default_rng(0)
    cases = [(1, 0), (5, 0), (7, 3), (50, 20), (200, 150), (300, 900)]
    cases += [(int(rng.integers(1, 300)), int(rng.integers(0, 400))) for _ in range(40)]
    for n, m in cases:
        a, b = rng.integers(0, n, m), rng.integers(0, n, m)
        np.testing.assert_array_equal(union_find(n, a, b), _scipy_labels(n, a, b), err_msg=f"n={n} m={m}")
    n = 1000  # a long shuffled chain: one component however the ids are ordered
    perm = rng.permutation(n)
    assert not union_find(n, perm[:-1], perm[1:]).any()


def test_no_graphprune_module_imports_scipy_at_import_time() -> None:
    """scipy costs 0.4 s to import: only the large-graph branch of ``_components`` may load it."""
    root = Path(__file__).resolve().parent.parent / "graphprune"
    eager = []
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only: imports inside functions are lazy
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            eager += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "scipy"]
    assert eager == []


def test_the_reference_reads_buffers_uncopied_and_never_writes_them() -> None:
    """Buffers are no longer cloned for the masked reference (the traced program writes nothing):
    a pruned buffer the masking zeroes must be zeroed in a copy, never in the user's model."""
    import torch
    from oracles import assert_untouched, snapshot
    from torch import nn

    import graphprune

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.register_buffer("scale", torch.rand(8, 1, 1) + 0.5)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.conv(x)) * self.scale)

    torch.manual_seed(0)
    model, x = Scaled().eval(), torch.randn(1, 3, 8, 8)
    before = snapshot(model)
    small, plan = graphprune.compact_with_plan(model, x, ratio=0.5)
    assert small.scale.shape[0] < 8  # the buffer was pruned, so the reference masked it
    report = graphprune.verify_model(model, small, x, plan)
    assert report.exact and report.errors
    assert_untouched(model, before)


def test_a_compact_call_imports_nothing_heavy_on_the_way() -> None:
    """What a first call imports is paid inside it: numpy.ma (a plain ``np.unique`` imports it on
    first use, 15 ms), dynamo and sympy (torch.export's trace and verifier, seconds). A small CNN
    compacts, verified, without any of them (a fresh process: the test session imports them)."""
    import subprocess
    import sys

    script = (
        "import sys, torch\n"
        "from torch import nn\n"
        "import graphprune\n"
        "before = set(sys.modules)\n"
        "m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),"
        " nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()\n"
        "small = graphprune.compact(m, torch.randn(1, 3, 16, 16), ratio=0.5)\n"
        "assert small[0].out_channels == 4, small\n"
        "new = set(sys.modules) - before\n"
        "print(sorted(n for n in new if n.split('.')[0] in ('sympy', 'numpy', 'scipy')"
        " or n.startswith('torch._dynamo')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
