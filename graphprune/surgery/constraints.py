"""Width constraints of modules whose Python code ties sizes that no traced op ties.

The exported graph shows every ATen op, but a module may also *check* sizes in Python before it
calls them (``nn.MultiheadAttention`` asserts ``embed_dim`` everywhere). Surgery would produce a
model that fails those checks, so the analysis records them as couplings here, by module type.
"""

from __future__ import annotations

from torch import nn


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
    for path, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            _mha_constraints(path, mod, coupler)
