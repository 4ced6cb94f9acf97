"""Rules for matrix products and attention: matmul, bmm, addmm, einsum, SDPA (incl. GQA)."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
from torch.fx import Node

from graphprune.graph.labels import FIXED, Factor, Rescale, TensorLabels, new_joint
from graphprune.graph.rules.algebra import LETTERS, einsum_labels
from graphprune.graph.rules.registry import RuleContext, ops, rule, where


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
    if len(args) != 2 or any(ctx.from_weight(a) for a in args):
        return
    for arg, ls in zip(args, letters, strict=True):
        lab = ctx.labels(arg)
        if lab is None:
            continue
        for d, ch in enumerate(ls):
            f = lab.factor_at(d)
            if f is not None and ch not in out_letters and all(ch in other for other in letters):
                ctx.coupler.require_intact(f, f.axis_of(d), f"{where(node)}: contracts two activations")


def _inside_heads(ctx: RuleContext, node: Node, args, letters, out_letters: str) -> TensorLabels | None:
    """``attention="head_dim"``: ``q @ k^T`` loses the same channels in every head, never a head.

    Two activations contracted over a labelled dim are the attention scores. Position ``d`` of
    q's head ``h`` meets position ``d`` of k's head ``h`` (so they go together), and the letters
    kept in the output (the heads) keep their size, so the joint (heads, head_dim) layouts lose
    whole head_dim slices. The scores carry no labels: the probabilities @ v then keep v's heads
    whole too (a labelled dim meeting an unlabelled one). Returns None when this is not such a
    contraction (the usual einsum rule applies).
    """
    if ctx.options.get("attention") != "head_dim" or len(args) != 2:
        return None
    if any(ctx.from_weight(a) for a in args):
        return None
    labs = [ctx.labels(a) for a in args]
    if any(lab is None or not lab.factors for lab in labs):
        return None
    entries = [
        (k, "".join(letters[k][d] for d in f.dims), f) for k, lab in enumerate(labs) for f in lab.factors
    ]
    contracted = {ch for _, ls, _ in entries for ch in ls if ch not in out_letters}
    shared = set(letters[0]) & set(letters[1])
    if not any(ch in shared for ch in contracted):
        return None
    why = f"{where(node)}: heads kept (attention='head_dim')"
    for _, ls, f in entries:
        for ax, ch in enumerate(ls):
            if ch in out_letters:
                ctx.coupler.require_intact(f, ax, why)
    for _, la, fa in (e for e in entries if e[0] == 0):
        for _, lb, fb in (e for e in entries if e[0] == 1):
            if set(la) == set(lb):
                ctx.coupler.union(fa.ids, np.transpose(fb.ids, [lb.index(ch) for ch in la]))
            elif set(la) & set(lb):
                for f in (fa, fb):
                    ctx.coupler.freeze(f.ids, f"{where(node)}: incompatible channel layouts")
    return TensorLabels(ctx.shape(node), [])


def _block_repeats(ids: np.ndarray, axis: int) -> int:
    """r if the slices along ``axis`` come in runs of r identical copies (kv heads repeated)."""
    rows = np.moveaxis(ids, axis, 0).reshape(ids.shape[axis], -1)
    if (rows < 0).any():
        return 1
    r = 1
    while r < len(rows) and np.array_equal(rows[r], rows[0]):
        r += 1
    if len(rows) % r or not np.array_equal(rows, np.repeat(rows[::r], r, axis=0)):
        return 1
    return r


def _within_groups(ctx: RuleContext, node: Node, args, letters, out_letters: str) -> TensorLabels | None:
    """Hand-written grouped-query attention, pruned by q heads within the kv groups.

    After ``repeat_kv`` (expand + reshape, repeat_interleave) head ``h`` of k and v carries the
    ids of kv head ``h // r``; a single kv head broadcast to every q head (multi-query) leaves the
    head dim unlabelled while its channels are labelled. With ``attention="q_heads"`` (or
    multi-query attention, where whole groups would be everything) the kv operand is kept whole
    and the other operand's heads become units "slot j of every group": ``q @ k^T`` gives scores
    labelled by those q-head units, and ``probs @ v`` gives the output the same units over v's
    channels. Returns None when the op is not such a product.
    """
    mode = ctx.options.get("attention", "heads")
    if mode == "head_dim" or len(args) != 2 or any(ctx.from_weight(a) for a in args):
        return None
    labs = [ctx.labels(a) for a in args]
    if any(lab is None or not lab.factors for lab in labs):
        return None
    for kv in (0, 1):
        other = 1 - kv
        for ch in sorted(set(letters[kv]) & set(letters[other]) & set(out_letters)):
            fo = labs[other].factor_at(letters[other].index(ch))
            if fo is None or _block_repeats(fo.ids, fo.axis_of(letters[other].index(ch))) > 1:
                continue
            fr = labs[kv].factor_at(letters[kv].index(ch))
            n = ctx.shape(args[kv])[letters[kv].index(ch)]
            r = n if fr is None else _block_repeats(fr.ids, fr.axis_of(letters[kv].index(ch)))
            if r < 2 or (mode != "q_heads" and r != n):
                continue  # not repeated; or "heads" with several kv heads: whole groups (einsum rule)
            return _q_slots(ctx, node, labs, kv, fo, ch, r, letters, out_letters)
    return None


def _q_slots(ctx, node, labs, kv: int, fo, ch: str, r: int, letters, out_letters: str) -> TensorLabels:
    other = 1 - kv
    why = where(node)
    ctx.coupler.freeze_labels(labs[kv], f"{why}: kv heads kept (q heads pruned within groups)")
    lo = [letters[other][d] for d in fo.dims]
    q_rep = ctx.coupler.coarsen(fo, [lo.index(ch)]).ids
    slots = q_rep.reshape(-1, r)
    ctx.coupler.union(slots, slots[:1])
    for f in labs[other].factors:  # any other labelled dims stay whole
        if f is not fo:
            ctx.coupler.freeze(f.ids, f"{why}: incompatible channel layouts")
    # output: the head letter, plus the kv operand's labelled kept letters (v's channels)
    kept = {ch} | {letters[kv][d] for f in labs[kv].factors for d in f.dims if letters[kv][d] in out_letters}
    dims = sorted(out_letters.index(c) for c in kept)
    oshape = ctx.shape(node)
    shape = [oshape[d] for d in dims]
    head_axis = dims.index(out_letters.index(ch))
    rest = [n for i, n in enumerate(shape) if i != head_axis]
    grid = np.broadcast_to(q_rep.reshape([-1] + [1] * len(rest)), [shape[head_axis]] + rest)
    ids = np.moveaxis(grid, 0, head_axis).copy()
    return TensorLabels(oshape, [new_joint(ctx.coupler, tuple(dims), ids, why)])


@rule(*ops("matmul.default", "mm.default", "bmm.default"))
def matmul(ctx: RuleContext, node: Node):
    a, b = node.args[0], node.args[1]
    sa, sb, so = ctx.shape(a), ctx.shape(b), ctx.shape(node)
    la, lb, lo = _matmul_letters(len(sa), len(sb))
    special = _inside_heads(ctx, node, [a, b], [la, lb], lo) or _within_groups(
        ctx, node, [a, b], [la, lb], lo
    )
    if special is not None:
        return special
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


@rule(*ops("_grouped_mm.default"))
def grouped_mm(ctx: RuleContext, node: Node):
    """``torch.nn.functional.grouped_mm``: rows of ``a`` (tokens sorted by expert, ``offs`` their
    boundaries) times their group's matrix of a stack ``b`` (experts x K x N): the einsum
    ``sk,ekn->sn`` with the expert dim whole (which rows meet which expert is decided by value),
    or a batched product ``emk,ekn->emn`` without ``offs``. Other layouts keep their channels."""
    a, b = node.args[0], node.args[1]
    offs = node.args[2] if len(node.args) > 2 else node.kwargs.get("offs")
    bias = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
    sa, sb, so = ctx.shape(a), ctx.shape(b), ctx.shape(node)
    why = where(node)
    if isinstance(offs, Node):
        ctx.coupler.freeze_labels(ctx.labels(offs), f"{why}: group offsets")
    if sa is None or sb is None or so is None:
        return None
    if len(sa) == 2 and len(sb) == 3 and offs is not None:
        la, lb, lo = "SK", "EKN", "SN"
    elif len(sa) == 3 and len(sb) == 3 and offs is None:
        la, lb, lo = "EMK", "EKN", "EMN"
    else:
        for t in (a, b, bias):
            ctx.coupler.freeze_labels(ctx.labels(t), f"{why}: grouped product layout")
        return TensorLabels(so, [])
    lab_b = ctx.labels(b)
    f = lab_b.factor_at(0) if lab_b is not None else None
    if f is not None:  # the stack's expert dim: rows are routed to experts by value
        ctx.coupler.require_intact(f, f.axis_of(0), f"{why}: experts of a grouped product")
    _keep_contracted_whole(ctx, node, [a, b], [la, lb], lo)
    operands = [(ctx.labels(a), sa, la), (lab_b, sb, lb)]
    if isinstance(bias, Node) and ctx.shape(bias) is not None and len(ctx.shape(bias)) == 2:
        operands.append((ctx.labels(bias), ctx.shape(bias), "EN"))  # one bias row per expert
    return einsum_labels(ctx.coupler, operands, lo, so, why)


@rule(*ops("einsum.default"))
def einsum(ctx: RuleContext, node: Node):
    eq = node.args[0].replace(" ", "")
    tensors = list(node.args[1])
    if "..." in eq or "->" not in eq:
        for t in tensors:
            ctx.coupler.freeze_labels(ctx.labels(t), f"{where(node)}: implicit einsum")
        return TensorLabels(ctx.shape(node), [])
    lhs, out = eq.split("->")
    specs = lhs.split(",")
    special = _inside_heads(ctx, node, tensors, specs, out) or _within_groups(ctx, node, tensors, specs, out)
    if special is not None:
        return special
    _keep_contracted_whole(ctx, node, tensors, lhs.split(","), out)
    operands = [(ctx.labels(t), ctx.shape(t), spec) for t, spec in zip(tensors, lhs.split(","), strict=True)]
    return einsum_labels(ctx.coupler, operands, out, ctx.shape(node), where(node))


def _head_grid(ctx: RuleContext, lab: TensorLabels | None, shape, why: str, inside: bool = False):
    """Ids over (heads, head_dim) = dims (-3, -1) of an attention operand, merged per unit.

    The output of attention at head h depends on every position of head h in q, k and v, so by
    default a head is one unit (whole-head pruning): returns one representative id per head.
    ``inside=True`` (``attention="head_dim"``) merges across heads instead: unit ``d`` is channel
    ``d`` of every head, and one representative id per head_dim position is returned.
    """
    r = len(shape)
    hd, dd = r - 3, r - 1
    keep, merged = (dd, hd) if inside else (hd, dd)
    rep = np.full(shape[keep], FIXED, dtype=np.int64)
    if lab is None:
        return rep
    for f in lab.factors:
        if keep in f.dims:
            rep = ctx.coupler.coarsen(f, [f.axis_of(keep)]).ids
        elif merged in f.dims:
            ctx.coupler.require_intact(f, f.axis_of(merged), why)
        for d in f.dims:
            if d not in (hd, dd):
                ctx.coupler.require_intact(f, f.axis_of(d), why)
    return rep


def kv_repeats(lab: TensorLabels | None, shape) -> int:
    """How many consecutive heads of a k/v operand are copies of one kv head (else 1).

    ``expand`` + ``reshape`` and ``repeat_interleave`` copy ids, so head ``h`` of the repeated
    tensor carries exactly the ids of kv head ``h // r``: the grouping is read off the labels. A
    single kv head broadcast to every head (multi-query ``repeat_kv``) leaves the head dim
    unlabelled while the channels are labelled: all heads are copies.
    """
    if lab is None or not lab.factors:
        return 1
    dim = len(shape) - 3
    f = lab.factor_at(dim)
    return shape[dim] if f is None else _block_repeats(f.ids, f.axis_of(dim))


def _scale_given(node: Node) -> bool:
    """SDPA's default scale is 1/sqrt(head_dim): it changes when head_dim does."""
    return node.kwargs.get("scale") is not None


_THROUGH = set(
    ops(
        "view.default", "reshape.default", "_unsafe_view.default", "transpose.int", "permute.default",
        "t.default", "contiguous.default", "clone.default", "select.int", "slice.Tensor",
        "unsqueeze.default", "squeeze.dim", "squeeze.dims", "expand.default", "alias.default",
        "_to_copy.default", "to.dtype", "to.dtype_layout", "neg.default", "split.Tensor",
        "split_with_sizes.default", "chunk.default", "unbind.int",
    )
)
_LINEAR = set(ops("linear.default"))
_MUL = set(ops("mul.Tensor", "mul.Scalar"))
_SCALE_BY = _MUL | set(ops("div.Tensor", "div.Scalar"))
_SUM = set(ops("add.Tensor", "sub.Tensor"))
_CAT = set(ops("cat.default"))


def _depends(node: Any, target: Node, limit: int = 4000) -> bool:
    """Whether ``node`` is computed from ``target`` (bounded walk over its inputs)."""
    if not isinstance(node, Node):
        return False
    todo, seen = [node], set()
    while todo and len(seen) < limit:
        n = todo.pop()
        if n is target:
            return True
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return len(seen) >= limit


def _linear_source(node: Any, depth: int = 0) -> Node | None:
    """The ``linear`` op whose output ``node`` is a linear function of, and nothing else.

    Reshapes, transposes, selections, casts, negation, sums of such terms, concatenations and
    products with tensors that do not depend on it (rotary cos/sin tables, constants) keep the
    relation linear: scaling the Linear's rows scales ``node`` by the same factor.
    """
    if not isinstance(node, Node) or node.op != "call_function" or depth > 64:
        return None
    t = node.target
    if t in _LINEAR:
        return node
    if t is operator.getitem or t in _THROUGH:
        return _linear_source(node.args[0], depth + 1)
    if t in _SCALE_BY:
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else None
        src = _linear_source(a, depth + 1)
        if src is not None and not _depends(b, src):
            return src
        if t in _MUL:
            src = _linear_source(b, depth + 1)
            if src is not None and not _depends(a, src):
                return src
        return None
    if t in _SUM or t in _CAT:
        parts = list(node.args[0]) if t in _CAT else list(node.args[:2])
        srcs = {_linear_source(p, depth + 1) for p in parts}
        return srcs.pop() if len(srcs) == 1 and None not in srcs else None
    return None


def _fold_scale_into_q(ctx: RuleContext, node: Node) -> bool:
    """Let SDPA's default scale follow head_dim: record that q's Linear rows get sqrt(E'/E).

    SDPA without ``scale=`` multiplies by 1/sqrt(E), E the head size. Removing channels inside
    heads makes that 1/sqrt(E'); multiplying q by sqrt(E'/E) gives back the original logits,
    exactly. That is possible when q is a linear function of one Linear's rows (``_linear_source``):
    those rows (and their bias) are scaled at surgery. Returns False (whole heads, then) otherwise.
    """
    q = node.args[0]
    src = _linear_source(q)
    lab, shape = ctx.labels(q), ctx.shape(q)
    f = lab.factor_at(len(shape) - 1) if lab is not None and shape is not None else None
    weight = ctx.param_names.get(src.args[1]) if src is not None else None
    if f is None or weight is None or (weight, 0) not in ctx.coupler.param_ids:
        return False
    rows = np.flatnonzero(np.isin(ctx.coupler.param_ids[(weight, 0)], f.ids))
    if rows.size == 0:
        return False
    bias = ctx.param_names.get(src.args[2]) if len(src.args) > 2 and isinstance(src.args[2], Node) else None
    ctx.coupler.rescales.append(Rescale(weight, bias, rows, f.ids, f.axis_of(len(shape) - 1)))
    return True


def _per_head_mask(ctx: RuleContext, node: Node, mask, hq: int, q_rep: np.ndarray, why: str) -> None:
    """A per-head additive mask (Swin's relative position bias) goes with its (q) head."""
    smask, mlab = ctx.shape(mask), ctx.labels(mask)
    mdim = len(smask) - 3 if smask is not None and len(smask) >= 3 else None
    if mdim is not None and smask[-3] == hq and hq > 1:
        mf = mlab.factor_at(mdim) if mlab else None
        if mf is None:
            ctx.coupler.freeze(q_rep, f"{why}: per-head attention mask of fixed size")
        else:
            ctx.coupler.union(ctx.coupler.coarsen(mf, [mf.axis_of(mdim)]).ids, q_rep)
    if mlab is not None:
        for f in mlab.factors:
            if mdim is None or mdim not in f.dims or smask[-3] != hq:
                ctx.coupler.freeze(f.ids, f"{why}: attention mask labelled off the head dim")


@rule(
    *ops(
        "scaled_dot_product_attention.default",
        "_scaled_dot_product_flash_attention_for_cpu.default",
        "_scaled_dot_product_efficient_attention.default",
        "_scaled_dot_product_flash_attention.default",
    )
)
def sdpa(ctx: RuleContext, node: Node):
    """softmax(q k^T) v per head; what a unit is follows ``attention`` (analysis.ATTENTION_MODES).

    With grouped-query attention (fewer kv heads, or kv heads repeated before the call) q heads
    ``g*r .. g*r+r-1`` share kv head ``g``: "heads" removes whole groups (multi-query: q heads,
    the single kv head stays), "q_heads" removes the same slot of every group (r shrinks, the kv
    heads stay), "head_dim" removes channel d of every q, k and v head (with an explicit scale, or
    SDPA's default one folded into q's rows; else whole heads).
    """
    q, k, v = node.args[0], node.args[1], node.args[2]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    why = where(node)
    sq, sk = ctx.shape(q), ctx.shape(k)
    vals = node.meta.get("val")
    oshape = tuple(vals[0].shape) if isinstance(vals, (tuple, list)) else ctx.shape(node)
    if len(sq) < 3 or sq[-3] % sk[-3]:
        for arg in (q, k, v):
            ctx.coupler.freeze_labels(ctx.labels(arg), f"{why}: unsupported head layout")
        result = TensorLabels(oshape, [])
    else:
        mode = ctx.options.get("attention", "heads")
        if mode == "head_dim" and (_scale_given(node) or _fold_scale_into_q(ctx, node)):
            result = _sdpa_inside(ctx, node, mask, oshape, why)
        else:
            result = _sdpa_heads(ctx, node, mask, oshape, why, mode)
    if isinstance(vals, (tuple, list)):
        return [result] + [None] * (len(vals) - 1)
    return result


def _sdpa_heads(ctx: RuleContext, node: Node, mask, oshape, why: str, mode: str) -> TensorLabels:
    q, k, v = node.args[0], node.args[1], node.args[2]
    sq, sk, sv = ctx.shape(q), ctx.shape(k), ctx.shape(v)
    lq, lk, lv = ctx.labels(q), ctx.labels(k), ctx.labels(v)
    hq = sq[-3]
    q_rep = _head_grid(ctx, lq, sq, why)
    k_rep = _head_grid(ctx, lk, sk, why)
    v_rep = _head_grid(ctx, lv, sv, why)
    ctx.coupler.union(k_rep, v_rep)
    # kv heads: given at their own count (enable_gqa) or repeated (ids copied) before the call
    rk = min(kv_repeats(lk, sk), kv_repeats(lv, sv)) if sk[-3] == hq else 1
    k_rep, v_rep = k_rep[::rk], v_rep[::rk]
    hk = len(k_rep)
    r = hq // hk
    if r > 1 and (mode == "q_heads" or hk == 1):
        # the same slot of every group goes; kv heads (and the kv cache) stay
        ctx.coupler.freeze(k_rep, f"{why}: kv heads kept (q heads pruned within groups)")
        slots = q_rep.reshape(hk, r)
        ctx.coupler.union(slots, slots[:1])
        _per_head_mask(ctx, node, mask, hq, q_rep, why)
        ids = np.broadcast_to(q_rep[:, None], (hq, sv[-1])).copy()
        return TensorLabels(oshape, [new_joint(ctx.coupler, (len(oshape) - 3, len(oshape) - 1), ids, why)])
    ctx.coupler.union(q_rep.reshape(hk, r), k_rep[:, None])
    _per_head_mask(ctx, node, mask, hq, q_rep, why)
    return _output_from_v(ctx, lv, sv, oshape, hq, why)


def _sdpa_inside(ctx: RuleContext, node: Node, mask, oshape, why: str) -> TensorLabels:
    """``attention="head_dim"`` (scale fixed, or folded into q): channel d of every head is one unit."""
    q, k, v = node.args[0], node.args[1], node.args[2]
    sq, sk, sv = ctx.shape(q), ctx.shape(k), ctx.shape(v)
    lq, lk, lv = ctx.labels(q), ctx.labels(k), ctx.labels(v)
    q_rep = _head_grid(ctx, lq, sq, why, inside=True)
    k_rep = _head_grid(ctx, lk, sk, why, inside=True)
    v_rep = _head_grid(ctx, lv, sv, why, inside=True)
    ctx.coupler.union(q_rep, k_rep)
    if sv[-1] == sq[-1]:  # one head_dim for q, k and v: one attribute describes them all
        ctx.coupler.union(q_rep, v_rep)
    mlab = ctx.labels(mask)
    if mlab is not None:
        ctx.coupler.freeze_labels(mlab, f"{why}: attention mask (heads kept with attention='head_dim')")
    return _output_from_v(ctx, lv, sv, oshape, sq[-3], why)


def _output_from_v(ctx: RuleContext, lv, sv, oshape, hq: int, why: str) -> TensorLabels:
    """Output (..., Hq, L, Ev): head h repeats kv head h // r; head_dim keeps v's labels."""
    out_factors: list[Factor] = []
    if lv is not None:
        f = lv.factor_at(len(sv) - 3)
        r = hq // sv[-3]
        if f is not None:
            ids = np.repeat(f.ids, r, axis=f.axis_of(len(sv) - 3)) if r > 1 else f.ids
            dims = tuple(d - len(sv) + len(oshape) for d in f.dims)
            out_factors.append(new_joint(ctx.coupler, dims, ids, why))
        elif (f := lv.factor_at(len(sv) - 1)) is not None and len(f.dims) == 1:
            out_factors.append(Factor((len(oshape) - 1,), f.ids))
    return TensorLabels(oshape, out_factors)
