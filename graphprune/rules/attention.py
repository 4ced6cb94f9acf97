"""Rules for matrix products and attention: matmul, bmm, addmm, einsum, SDPA (incl. GQA)."""

from __future__ import annotations

import numpy as np
from torch.fx import Node

from graphprune.labels import FIXED, Factor, TensorLabels, new_joint
from graphprune.rules import RuleContext, ops, rule, where
from graphprune.rules.algebra import LETTERS, einsum_labels


def _matmul_letters(ra: int, rb: int) -> tuple[str, str, str]:
    """Letters for torch.matmul's broadcasting semantics (1-D operands included)."""
    contract, m, n = "Z", "Y", "X"
    a = ([m] if ra > 1 else []) + [contract]
    b = [contract] + ([n] if rb > 1 else [])
    batch = max(ra, rb) - 2
    if batch > 0:
        bl = LETTERS[:batch]
        a = list(bl[batch - (ra - 2) :]) + a if ra > 2 else a
        b = list(bl[batch - (rb - 2) :]) + b if rb > 2 else b
        out = list(bl) + ([m] if ra > 1 else []) + ([n] if rb > 1 else [])
    else:
        out = ([m] if ra > 1 else []) + ([n] if rb > 1 else [])
    return "".join(a), "".join(b), "".join(out)


def _keep_contracted_whole(ctx: RuleContext, node: Node, args, letters, out_letters: str) -> None:
    """Two activations contracted over a labelled dim (attention scores ``q @ k^T``): keep it whole.

    The contraction itself survives pruning, but user code scales it by a constant computed from
    that size (``self.head_dim ** -0.5``), which would change behind the graph's back once surgery
    updates ``head_dim`` (single-head attention, found by fuzzing). Whole heads stay prunable.
    """
    if len(args) != 2 or any(a in ctx.param_names for a in args):
        return
    for arg, ls in zip(args, letters, strict=True):
        lab = ctx.labels(arg)
        if lab is None:
            continue
        for d, ch in enumerate(ls):
            f = lab.factor_at(d)
            if f is not None and ch not in out_letters and all(ch in other for other in letters):
                ctx.coupler.require_intact(f, f.axis_of(d), f"{where(node)}: contracts two activations")


@rule(*ops("matmul.default", "mm.default", "bmm.default"))
def matmul(ctx: RuleContext, node: Node):
    a, b = node.args[0], node.args[1]
    sa, sb, so = ctx.shape(a), ctx.shape(b), ctx.shape(node)
    la, lb, lo = _matmul_letters(len(sa), len(sb))
    _keep_contracted_whole(ctx, node, [a, b], [la, lb], lo)
    operands = [(ctx.labels(a), sa, la), (ctx.labels(b), sb, lb)]
    return einsum_labels(ctx.coupler, operands, lo, so, where(node))


@rule(*ops("addmm.default", "baddbmm.default", "addbmm.default"))
def addmm(ctx: RuleContext, node: Node):
    bias, a, b = node.args[0], node.args[1], node.args[2]
    sa, sb, so = ctx.shape(a), ctx.shape(b), ctx.shape(node)
    la, lb, lo = _matmul_letters(len(sa), len(sb))
    sbias = ctx.shape(bias)
    operands = [(ctx.labels(a), sa, la), (ctx.labels(b), sb, lb)]
    if sbias is not None:
        operands.append((ctx.labels(bias), sbias, lo[len(lo) - len(sbias) :]))
    return einsum_labels(ctx.coupler, operands, lo, so, where(node))


@rule(*ops("einsum.default"))
def einsum(ctx: RuleContext, node: Node):
    eq = node.args[0].replace(" ", "")
    tensors = list(node.args[1])
    if "..." in eq or "->" not in eq:
        for t in tensors:
            ctx.coupler.freeze_labels(ctx.labels(t), f"{where(node)}: implicit einsum")
        return TensorLabels(ctx.shape(node), [])
    lhs, out = eq.split("->")
    _keep_contracted_whole(ctx, node, tensors, lhs.split(","), out)
    operands = [(ctx.labels(t), ctx.shape(t), spec) for t, spec in zip(tensors, lhs.split(","), strict=True)]
    return einsum_labels(ctx.coupler, operands, out, ctx.shape(node), where(node))


def _head_grid(ctx: RuleContext, lab: TensorLabels | None, shape, why: str) -> np.ndarray:
    """Ids over (heads, head_dim) = dims (-3, -1) of an attention operand, merged per head.

    The output of attention at head h depends on every position of head h in q, k and v, so a
    head is one unit (whole-head pruning). Returns one representative id per head.
    """
    r = len(shape)
    hd, dd = r - 3, r - 1
    heads = shape[hd]
    if lab is None:
        return np.full(heads, FIXED, dtype=np.int64)
    rep = np.full(heads, FIXED, dtype=np.int64)
    for f in lab.factors:
        if hd in f.dims:
            g = ctx.coupler.coarsen(f, [f.axis_of(hd)])
            rep = g.ids
        elif dd in f.dims:
            ctx.coupler.require_intact(f, f.axis_of(dd), why)
        for d in f.dims:
            if d not in (hd, dd):
                ctx.coupler.require_intact(f, f.axis_of(d), why)
    return rep


@rule(
    *ops(
        "scaled_dot_product_attention.default",
        "_scaled_dot_product_flash_attention_for_cpu.default",
        "_scaled_dot_product_efficient_attention.default",
        "_scaled_dot_product_flash_attention.default",
    )
)
def sdpa(ctx: RuleContext, node: Node):
    """softmax(q k^T) v per head. With GQA, q heads h*r..h*r+r-1 share kv head h: whole groups go."""
    q, k, v = node.args[0], node.args[1], node.args[2]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    why = where(node)
    sq, sk, sv = ctx.shape(q), ctx.shape(k), ctx.shape(v)
    vals = node.meta.get("val")
    oshape = tuple(vals[0].shape) if isinstance(vals, (tuple, list)) else ctx.shape(node)
    lq, lk, lv = ctx.labels(q), ctx.labels(k), ctx.labels(v)
    hq, hk = sq[-3], sk[-3]
    if len(sq) < 3 or hq % hk:
        for lab in (lq, lk, lv):
            ctx.coupler.freeze_labels(lab, f"{why}: unsupported head layout")
        return TensorLabels(oshape, [])
    r = hq // hk
    q_rep = _head_grid(ctx, lq, sq, why)
    k_rep = _head_grid(ctx, lk, sk, why)
    v_rep = _head_grid(ctx, lv, sv, why)
    ctx.coupler.union(k_rep, v_rep)
    ctx.coupler.union(q_rep.reshape(hk, r), k_rep[:, None])
    smask = ctx.shape(mask)
    mlab = ctx.labels(mask)
    head_dim_of_mask = len(smask) - 3 if smask is not None and len(smask) >= 3 else None
    if head_dim_of_mask is not None and smask[-3] == hq and hq > 1:
        mf = mlab.factor_at(head_dim_of_mask) if mlab else None
        if mf is None:
            ctx.coupler.freeze(q_rep, f"{why}: per-head attention mask of fixed size")
        else:
            # a per-head additive bias (Swin's relative position bias) belongs to its head
            ctx.coupler.union(ctx.coupler.coarsen(mf, [mf.axis_of(head_dim_of_mask)]).ids, q_rep)
    if mlab is not None:
        for f in mlab.factors:
            if head_dim_of_mask is None or head_dim_of_mask not in f.dims or smask[-3] != hq:
                ctx.coupler.freeze(f.ids, f"{why}: attention mask labelled off the head dim")
    # output (..., Hq, L, Ev): heads repeat kv ids; head_dim keeps v's labels per position
    out_factors: list[Factor] = []
    if lv is not None:
        f = lv.factor_at(len(sv) - 3)
        if f is not None:
            ids = np.repeat(f.ids, r, axis=f.axis_of(len(sv) - 3)) if r > 1 else f.ids
            dims = tuple(d - len(sv) + len(oshape) for d in f.dims)
            out_factors.append(new_joint(ctx.coupler, dims, ids, why))
    out = TensorLabels(oshape, out_factors)
    if isinstance(vals, (tuple, list)):
        return [out] + [None] * (len(vals) - 1)
    return out


# ---------------------------------------------------------------------------------------------
# Module-level constraints and attribute updates that no single ATen op can express
# ---------------------------------------------------------------------------------------------


def _mha_constraints(path: str, mod, coupler) -> None:
    """nn.MultiheadAttention computes with one width, ``embed_dim``, everywhere.

    ``F.multi_head_attention_forward`` asserts that the query's last dim equals ``embed_dim``, that
    the packed ``in_proj_weight`` has ``3 * embed_dim`` rows and that ``out_proj`` maps back to
    ``embed_dim``; ``head_dim = embed_dim // num_heads``. So the q rows (the heads' channels), the
    query input channels and the output channels must be removed together, position by position.
    Where the input is the residual stream (frozen unless ``prune_hidden=True``) the heads stay;
    otherwise heads go together with the channels of the layer feeding the query.
    """
    prefix = f"{path}." if path else ""
    e = mod.embed_dim
    ids = coupler.param_ids
    if mod._qkv_same_embed_dim:
        rows = ids.get((prefix + "in_proj_weight", 0))
        cols = ids.get((prefix + "in_proj_weight", 1))
    else:
        rows = ids.get((prefix + "q_proj_weight", 0))
        cols = ids.get((prefix + "q_proj_weight", 1))
    out_rows = ids.get((prefix + "out_proj.weight", 0))
    if rows is None:
        return
    q_rows = rows[:e]
    for other in (cols, out_rows):
        if other is not None and len(other) == e:
            coupler.union(q_rows, other)
    if mod.bias_k is not None:  # add_bias_kv: (1, 1, E) tensors concatenated to k and v
        for name in ("bias_k", "bias_v"):
            bias = ids.get((prefix + name, 2))
            if bias is not None:
                coupler.union(q_rows, bias)


def module_constraints(model, coupler) -> None:
    """Constraints of modules whose Python code ties widths the traced ops do not tie."""
    from torch import nn

    for path, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            _mha_constraints(path, mod, coupler)


_HEAD_COUNT_WORDS = ("head",)
_NOT_HEAD_COUNT_WORDS = ("dim", "size", "width", "mask", "idx", "index", "layer")


def _head_count_attr(attr: str) -> bool:
    a = attr.lower()
    return any(w in a for w in _HEAD_COUNT_WORDS) and not any(w in a for w in _NOT_HEAD_COUNT_WORDS)


def _head_dim_attr(attr: str) -> bool:
    a = attr.lower()
    return a in ("head_dim", "head_size", "d_head", "dim_head", "attention_head_size", "d_k", "d_v")


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
    gets the new one. Likewise ``head_dim``-named attributes when heads lose channels inside.
    ``known`` (updates found from graph constants) wins over these.
    """
    from graphprune.plan import AttrUpdate

    per_module: dict[str, dict[tuple[int, bool], set[int]]] = {}
    for node in analysis.traced.program.graph.nodes:
        if node.op != "call_function" or node.target not in ATTENTION_OPS:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        for arg in node.args[:3]:
            if not isinstance(arg, Node):
                continue
            shape = arg.meta.get("val").shape if hasattr(arg.meta.get("val"), "shape") else None
            if shape is None or len(shape) != 4:
                continue
            lab = analysis.labels.get(arg)
            if not isinstance(lab, TensorLabels):
                continue
            for dim, is_dim in ((1, False), (3, True)):
                old = int(shape[dim])
                new = sizer.size(lab, dim, old)
                if new != old:
                    per_module.setdefault(path, {}).setdefault((old, is_dim), set()).add(new)
    taken = {(u.module, u.attr) for u in known}
    ups = []
    for path, mapping in per_module.items():
        try:
            mod = model.get_submodule(path) if path else model
        except AttributeError:
            continue
        for attr, val in vars(mod).items():
            if attr.startswith("_") or type(val) is not int or (path, attr) in taken:
                continue
            for (old, is_dim), news in mapping.items():
                named = _head_dim_attr(attr) if is_dim else _head_count_attr(attr)
                if val == old and named and len(news) == 1:
                    ups.append(AttrUpdate(path, attr, old, next(iter(news))))
    return ups
