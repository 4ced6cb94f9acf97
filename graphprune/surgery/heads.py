"""Head-count attributes (``num_heads``, ``head_dim``, ``num_key_value_groups``) after surgery.

Attention reshapes often split heads with ``-1`` and merge them with ``self.num_heads *
self.head_dim``, so no graph constant holds the head count; it is read off the shapes of the
attention ops' operands instead, and matched to integer attributes named like head counts of the
module running the op.
"""

from __future__ import annotations

from typing import Any

from torch.fx import Node

from graphprune.graph.labels import TensorLabels
from graphprune.graph.rules.attention import kv_repeats
from graphprune.graph.rules.registry import int_attributes, module_path, ops
from graphprune.planning.plan import AttrUpdate
from graphprune.surgery.sizes import UncertainUpdate

_HEAD_COUNT_WORDS = ("head",)
_NOT_HEAD_COUNT_WORDS = ("dim", "size", "width", "mask", "idx", "index", "layer")


def _head_count_attr(attr: str) -> bool:
    a = attr.lower()
    return any(w in a for w in _HEAD_COUNT_WORDS) and not any(w in a for w in _NOT_HEAD_COUNT_WORDS)


def _head_dim_attr(attr: str) -> bool:
    a = attr.lower()
    return a in ("head_dim", "head_size", "d_head", "dim_head", "attention_head_size", "d_k", "d_v")


def _group_attr(attr: str) -> bool:
    """``num_key_value_groups``, ``n_rep``, ``num_queries_per_kv``: q heads per kv head."""
    a = attr.lower()
    return any(w in a for w in ("group", "rep", "per_kv")) and not any(w in a for w in ("dim", "size"))


def _shape4(arg: Any) -> tuple[int, ...] | None:
    val = arg.meta.get("val") if isinstance(arg, Node) else None
    shape = tuple(val.shape) if hasattr(val, "shape") else None
    return shape if shape is not None and len(shape) == 4 else None


ATTENTION_OPS = ops(
    "scaled_dot_product_attention.default",
    "_scaled_dot_product_flash_attention_for_cpu.default",
    "_scaled_dot_product_efficient_attention.default",
    "_scaled_dot_product_flash_attention.default",
    "matmul.default",
)


def head_count_updates(analysis, sizer, model, known) -> list:
    """``self.num_heads``-style attributes of modules running attention, for the new head count.

    Reshapes often split heads with ``-1`` (``view(B, N, -1, self.head_dim)``) and merge them
    with ``self.num_heads * self.head_dim``: the graph then holds no constant equal to
    ``num_heads``, so the constant-driven search cannot find it. The head count is the size of
    dim -3 of every attention operand (q, k, v); an integer attribute named like a head count
    (``num_heads``, ``n_kv_heads``...) of the module running that op, holding the old count,
    gets the new one. Likewise ``head_dim``-named attributes when heads lose channels inside,
    and q-heads-per-kv-head attributes when q heads go within groups. ``known`` (updates found
    from graph constants) wins over these, except uncertain ones, which these replace.
    """
    per_module: dict[str, dict[tuple[int, str], set[int]]] = {}
    for node in analysis.traced.program.graph.nodes:
        if node.op != "call_function" or node.target not in ATTENTION_OPS:
            continue
        path = module_path(node)
        heads: list[tuple[int, int, int]] = []  # (old, new, repeats) of dim 1 of q and k
        for arg in node.args[:3]:
            shape = _shape4(arg)
            lab = analysis.labels.get(arg) if shape else None
            if not isinstance(lab, TensorLabels):
                continue
            for dim, kind in ((1, "count"), (3, "dim")):
                old = int(shape[dim])
                new = sizer.size(lab, dim, old)
                if new != old:
                    per_module.setdefault(path, {}).setdefault((old, kind), set()).add(new)
            heads.append((int(shape[1]), sizer.size(lab, 1, int(shape[1])), kv_repeats(lab, shape)))
        if len(heads) >= 2:
            # q heads per kv head (HF's num_key_value_groups): changes with attention="q_heads"
            (q_old, q_new, _), (k_old, k_new, rk) = heads[0], heads[1]
            if k_old % rk == 0 and k_new % rk == 0 and k_new:
                r_old, r_new = q_old // (k_old // rk), q_new // max(k_new // rk, 1)
                if r_old != r_new:
                    per_module.setdefault(path, {}).setdefault((r_old, "group"), set()).add(r_new)
    # an uncertain graph-constant guess (a view constant equal to head_dim) is settled here: the
    # attention op's operand shapes say what head_dim is (Phi: leaving it ran, wrongly regrouped)
    taken = {(u.module, u.attr) for u in known if not isinstance(u, UncertainUpdate)}
    ups = []
    for path, mapping in per_module.items():
        for attr, val in int_attributes(model, path):
            if (path, attr) in taken:
                continue
            for (old, kind), news in mapping.items():
                named = {"dim": _head_dim_attr, "count": _head_count_attr, "group": _group_attr}[kind](attr)
                if val == old and named and len(news) == 1:
                    ups.append(AttrUpdate(path, attr, old, next(iter(news))))
    return ups
