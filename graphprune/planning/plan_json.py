"""Reading a plan from JSON: every field checked for type and range before anything uses it.

A plan file is data that will slice tensors and change module attributes, so it is read like
untrusted input: the text must be one JSON object in the format ``Plan.to_dict`` writes, and
every malformed piece (a JSON array, a string where indices belong, nesting deep enough to
exhaust Python's recursion limit, a missing key, another format version) becomes a
``PlanMismatchError`` naming the field. Text is only ever parsed, never taken for a file name:
``Plan.from_json(path)`` reads a file, and what the file holds is parsed as JSON, nothing else.
"""

from __future__ import annotations

import json
import math
from typing import Any

from graphprune.errors import PlanMismatchError

PLAN_FORMAT = "graphprune-plan/1"
_GROUP_TYPES: dict[str, Any] = {
    "index": int, "layers": str, "units": int, "removed": list, "frozen_units": int,
    "reason": (str, type(None)),
}


def _fail(where: str, what: str) -> PlanMismatchError:
    return PlanMismatchError(
        f"{where}: {what}; this is not a plan graphprune wrote (make a new one with make_plan or "
        "compact_with_plan)"
    )


def _int(v: Any, where: str, minimum: int | None = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(where, f"expected an integer, got {type(v).__name__} {v!r:.60}")
    if minimum is not None and v < minimum:
        raise _fail(where, f"expected an integer >= {minimum}, got {v}")
    return v


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise _fail(where, f"expected a string, got {type(v).__name__} {v!r:.60}")
    return v


def _list(v: Any, where: str) -> list[Any]:
    if not isinstance(v, list):
        raise _fail(where, f"expected a list, got {type(v).__name__}")
    return v


def _dict(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _fail(where, f"expected an object, got {type(v).__name__}")
    return v


def _strs(v: Any, where: str) -> list[str]:
    return [_str(x, f"{where}[{k}]") for k, x in enumerate(_list(v, where))]


def _ints(v: Any, where: str) -> list[int]:
    return [_int(x, f"{where}[{k}]") for k, x in enumerate(_list(v, where))]


def _size_value(v: Any, where: str) -> int | list[int]:
    """An attribute value: a non-negative int or a flat list of them (tuples are written as lists)."""
    if isinstance(v, list):
        return _ints(v, where)
    return _int(v, where)


def parse_text(text: str, where: str) -> Any:
    """``text`` parsed as JSON (any value; ``check_dict`` judges it); never read as a file name."""
    if not isinstance(text, str):
        raise PlanMismatchError(f"{where}: a plan is JSON text, got {type(text).__name__}")
    try:
        data = json.loads(text)
    except RecursionError as exc:
        raise PlanMismatchError(f"{where}: the JSON is nested too deeply to be a graphprune plan") from exc
    except (json.JSONDecodeError, ValueError) as exc:
        raise PlanMismatchError(f"{where} is not valid JSON: {exc}") from exc
    return data


def _keys(d: dict[str, Any], required: set[str], allowed: set[str], where: str) -> None:
    if required - set(d) or set(d) - allowed:
        raise _fail(where, f"expected the keys {sorted(allowed)}, got {sorted(d)}")


def _slices(v: Any, where: str) -> dict[str, dict[int, list[int]]]:
    slices: dict[str, dict[int, list[int]]] = {}
    for name, dims in _dict(v, where).items():
        per: dict[int, list[int]] = {}
        for dim, kept in _dict(dims, f"{where}[{name!r}]").items():
            if not dim.isdigit() or str(int(dim)) != dim:
                raise _fail(f"{where}[{name!r}]", f"dimension {dim!r:.40} is not a non-negative integer")
            idx = _ints(kept, f"{where}[{name!r}][{dim}]")
            if not idx or idx != sorted(set(idx)):
                raise _fail(f"{where}[{name!r}][{dim}]", "kept indices must be ascending and distinct")
            per[int(dim)] = idx
        slices[name] = per
    return slices


def _groups(v: Any, where: str) -> list[dict[str, Any]]:
    groups = []
    for i, g in enumerate(_list(v, where)):
        at = f"{where}[{i}]"
        g = _dict(g, at)
        _keys(g, {"index", "layers", "units", "removed"}, set(_GROUP_TYPES), at)
        for key, typ in _GROUP_TYPES.items():
            if key in g and typ is int:
                _int(g[key], f"{at}.{key}")
            elif key in g and not isinstance(g[key], typ):
                raise _fail(f"{at}.{key}", f"expected {typ}, got {type(g[key]).__name__}")
        groups.append({**g, "removed": _ints(g["removed"], f"{at}.removed")})
    return groups


def _attr_updates(v: Any, where: str) -> list[dict[str, Any]]:
    ups = []
    for i, a in enumerate(_list(v, where)):
        at = f"{where}[{i}]"
        a = _dict(a, at)
        _keys(a, {"module", "attr", "old", "new"}, {"module", "attr", "old", "new"}, at)
        ups.append({
            "module": _str(a["module"], f"{at}.module"),
            "attr": _str(a["attr"], f"{at}.attr"),
            "old": _size_value(a["old"], f"{at}.old"),
            "new": _size_value(a["new"], f"{at}.new"),
        })
    return ups


def _scales(v: Any, where: str) -> list[dict[str, Any]]:
    scales = []
    for i, e in enumerate(_list(v, where)):
        at = f"{where}[{i}]"
        e = _dict(e, at)
        _keys(e, {"tensor", "dim", "index", "factor"}, {"tensor", "dim", "index", "factor"}, at)
        f = e["factor"]
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or not 0 < f <= 1:
            raise _fail(f"{at}.factor", f"expected a number in (0, 1], got {f!r:.40}")
        scales.append({
            "tensor": _str(e["tensor"], f"{at}.tensor"),
            "dim": _int(e["dim"], f"{at}.dim"),
            "index": _ints(e["index"], f"{at}.index"),
            "factor": float(f),
        })
    return scales


def check_dict(d: Any, where: str = "plan") -> dict[str, Any]:
    """The fields of a plan dict with their types checked; raises PlanMismatchError on anything else."""
    if not isinstance(d, dict):
        kind = "array" if isinstance(d, list) else type(d).__name__
        raise PlanMismatchError(
            f"{where} holds a JSON {kind}, not a plan object (a graphprune plan is an object with "
            f"format {PLAN_FORMAT!r})"
        )
    if d.get("format") != PLAN_FORMAT:
        found = d.get("format")
        raise PlanMismatchError(f"{where} has format {found!r:.60}, this graphprune reads {PLAN_FORMAT!r}")
    for key in ("ratio", "importance", "slices"):
        if key not in d:
            raise _fail(where, f"the key {key!r} is missing")
    ratio = d["ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        raise _fail(f"{where}.ratio", f"expected a number, got {ratio!r:.60}")
    structure = _dict(d.get("structure", {}), f"{where}.structure")
    for key, v in structure.items():
        if not (v is None or isinstance(v, (bool, int, float, str))):
            raise _fail(f"{where}.structure[{key!r}]", "expected a plain value (bool, number or string)")
    texts = {
        key: [_str(x, f"{where}.{key}[{k}]") for k, x in enumerate(_list(d.get(key, []), f"{where}.{key}"))]
        for key in ("boundaries", "notes")
    }
    shapes = _dict(d.get("shapes", {}), f"{where}.shapes")
    return {
        "ratio": float(ratio),
        "importance": _str(d["importance"], f"{where}.importance"),
        "slices": _slices(d["slices"], f"{where}.slices"),
        "shapes": {name: _ints(s, f"{where}.shapes[{name!r}]") for name, s in shapes.items()},
        "groups": _groups(d.get("groups", []), f"{where}.groups"),
        "attr_updates": _attr_updates(d.get("attr_updates", []), f"{where}.attr_updates"),
        **texts,
        "structure": dict(structure),
        "scales": _scales(d.get("scales", []), f"{where}.scales"),
        "depth": _depth(d.get("depth", []), f"{where}.depth"),
        "biases": _strs(d.get("biases", []), f"{where}.biases"),
        "rewrites": _rewrites(d.get("rewrites", []), f"{where}.rewrites"),
    }


_DEPTH_KEYS = {
    "module", "cls", "container", "position", "tail", "score", "params", "zero", "skipped", "action",
}


def _plain(v: Any, where: str, depth: int = 0) -> Any:
    """A JSON value of at most two levels of lists/objects holding scalars (what DepthEntry writes)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if depth < 2 and isinstance(v, list):
        return [_plain(x, f"{where}[{k}]", depth + 1) for k, x in enumerate(v)]
    if depth < 2 and isinstance(v, dict):
        return {_str(k, where): _plain(x, f"{where}[{k!r}]", depth + 1) for k, x in v.items()}
    raise _fail(where, "expected a plain value")


def _depth(v: Any, where: str) -> list[dict[str, Any]]:
    """Removed blocks: objects with DepthEntry's keys; their modules are checked on replay."""
    out = []
    for k, e in enumerate(_list(v, where)):
        e = _dict(e, f"{where}[{k}]")
        unknown = sorted(set(e) - _DEPTH_KEYS)
        if unknown or not isinstance(e.get("module"), str) or not isinstance(e.get("cls"), str):
            raise _fail(f"{where}[{k}]", f"expected a removed block (module, cls, ...), got keys {sorted(e)}")
        out.append({key: _plain(x, f"{where}[{k}][{key!r}]") for key, x in e.items()})
    return out


def _input_item(v: Any, where: str) -> dict[str, Any]:
    """One recorded input of a rewritten module: a tensor's shape and dtype, or a plain value."""
    v = _dict(v, where)
    if set(v) == {"value"}:
        if not (v["value"] is None or isinstance(v["value"], (bool, int, float, str))):
            raise _fail(f"{where}.value", "expected a plain value")
        return dict(v)
    if set(v) == {"value", "sequence"}:  # a list or tuple of plain values (``feat_size=(H, W)``)
        if v["sequence"] not in ("list", "tuple"):
            raise _fail(f"{where}.sequence", "expected 'list' or 'tuple'")
        items = _list(v["value"], f"{where}.value")
        if not all(x is None or isinstance(x, (bool, int, float, str)) for x in items):
            raise _fail(f"{where}.value", "expected a list of plain values")
        return {"value": list(items), "sequence": v["sequence"]}
    _keys(v, {"shape", "dtype", "batch"}, {"shape", "dtype", "batch"}, where)
    if not isinstance(v["batch"], bool):
        raise _fail(f"{where}.batch", "expected true or false")
    return {"shape": _ints(v["shape"], f"{where}.shape"), "dtype": _str(v["dtype"], f"{where}.dtype"),
            "batch": v["batch"]}


def _rewrites(v: Any, where: str) -> list[dict[str, Any]]:
    """Modules rewritten as graphs (surgery.rewrite):
    {module, inputs: {args, kwargs, batch}, changes: [{node, at, old, new}]}."""
    out = []
    for k, e in enumerate(_list(v, where)):
        at = f"{where}[{k}]"
        e = _dict(e, at)
        _keys(e, {"module", "inputs", "changes"}, {"module", "inputs", "changes"}, at)
        inputs = _dict(e["inputs"], f"{at}.inputs")
        _keys(inputs, {"args", "kwargs", "batch"}, {"args", "kwargs", "batch"}, f"{at}.inputs")
        changes = []
        for j, c in enumerate(_list(e["changes"], f"{at}.changes")):
            cw = f"{at}.changes[{j}]"
            c = _dict(c, cw)
            _keys(c, {"node", "at", "old", "new"}, {"node", "at", "old", "new"}, cw)
            changes.append({"node": _str(c["node"], f"{cw}.node"), "at": _ints(c["at"], f"{cw}.at"),
                            "old": _int(c["old"], f"{cw}.old"), "new": _int(c["new"], f"{cw}.new")})
        out.append({
            "module": _str(e["module"], f"{at}.module"),
            "inputs": {
                "args": [_input_item(x, f"{at}.inputs.args[{j}]")
                         for j, x in enumerate(_list(inputs["args"], f"{at}.inputs.args"))],
                "kwargs": {_str(n, f"{at}.inputs.kwargs"): _input_item(x, f"{at}.inputs.kwargs[{n!r}]")
                           for n, x in _dict(inputs["kwargs"], f"{at}.inputs.kwargs").items()},
                "batch": _int(inputs["batch"], f"{at}.inputs.batch"),
            },
            "changes": changes,
        })
    return out
