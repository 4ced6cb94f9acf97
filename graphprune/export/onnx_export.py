"""Export a model to ONNX and prove that onnxruntime computes what torch computes.

Why this module exists: a pruned model is only useful if it still deploys, and the usual deployment
path is ONNX + onnxruntime. So the export is checked by an oracle (the torch model on the same
input) rather than trusted.

How it works:

1. The user's model, whatever its signature (a tensor, a tuple, a dict of keyword inputs, nested
   containers) and whatever it returns (tensors, tuples, dicts, Hugging Face ``ModelOutput``), is
   wrapped in :class:`_FlatModule`: positional tensors in, a flat tuple of tensors out. Non-tensor
   inputs (``use_cache=False``, ints, ``None``) are baked in as constants. Both exporters handle
   that calling convention, and the ONNX graph's inputs then map one-to-one to the tensor leaves
   of ``example_input``.
2. The legacy TorchScript exporter (``dynamo=False``) is tried first: it is fast and covers CNNs
   and encoders. It refuses some ops (notably ``scaled_dot_product_attention`` with
   ``enable_gqa=True``, used by Hugging Face LLaMA/Qwen2), in which case the torch.export-based
   exporter (``dynamo=True``, needs onnxscript) is tried. :class:`ExportResult` records which one
   produced the file.
3. ``onnx.checker`` validates the file, onnxruntime (CPU) runs it, and every output is compared
   with torch's. A mismatch raises :class:`~graphprune.errors.VerificationError` naming the output.

The model passed in is never modified: it is put in eval mode for the export (so dropout and
batch-norm statistics are inference-time) and every submodule's training flag is restored after.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.utils._pytree as pytree

from graphprune.errors import GraphPruneError, InputError, VerificationError
from graphprune.graph.inputs import eval_mode, flatten_outputs, normalize_inputs
from graphprune.graph.trace import no_cache

Exporter = Literal["torchscript", "dynamo"]

__all__ = [
    "ExportResult",
    "OnnxExportError",
    "compare_outputs",
    "export_onnx",
    "flat_input_tensors",
    "onnx_session",
    "run_onnx",
]

# Loggers whose warnings are pure noise for our users (e.g. "torchvision is not installed").
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript", "onnx_ir")
# Models whose parameters exceed this many bytes are saved with external data (ONNX protobuf limit 2 GiB).
_EXTERNAL_DATA_BYTES = 1_800_000_000


class OnnxExportError(GraphPruneError, RuntimeError):
    """Neither ONNX exporter could export the model (the message carries both failures)."""


@dataclass
class ExportResult:
    """What :func:`export_onnx` produced and how close onnxruntime came to torch.

    ``max_abs_err`` / ``max_rel_err`` are maxima over all outputs (``None`` when ``check=False``);
    the relative error of one output is ``max|onnx - torch| / max(max|torch|, tiny)``.
    """

    path: Path
    exporter: Exporter
    max_abs_err: float | None
    max_rel_err: float | None
    input_names: list[str]
    output_names: list[str]
    opset: int | None = None
    per_output_errors: list[tuple[float, float]] = field(default_factory=list)
    fallback_reason: str | None = None  # why the first exporter was not used, if it failed

    def __str__(self) -> str:
        err = (
            "not checked"
            if self.max_abs_err is None
            else f"max abs err {self.max_abs_err:.2e}, max rel err {self.max_rel_err:.2e}"
        )
        return f"{self.path} ({self.exporter} exporter, opset {self.opset}; {err})"


# --------------------------------------------------------------------------------------------------
# Inputs and outputs as flat lists


def _sanitize(name: str) -> str:
    name = re.sub(r"[^0-9A-Za-z_]+", "_", name).strip("_")
    return name or "input"


def _leaf_name(path: tuple[Any, ...], n_args: int) -> str:
    """Name a tensor leaf after where it sits in ``(args, kwargs)``.

    A keyword input keeps its keyword (``input_ids``); positional ones are ``input`` (if alone) or
    ``input_0``, ``input_1``...; nested positions append their keys/indices.
    """
    top, rest = path[0], path[1:]
    head: str
    if getattr(top, "idx", None) == 0:  # positional args
        if not rest:
            return "input"
        idx = getattr(rest[0], "idx", None)
        head = "input" if n_args == 1 else f"input_{idx}"
        rest = rest[1:]
    else:  # kwargs
        if not rest:
            return "input"
        head = str(getattr(rest[0], "key", rest[0]))
        rest = rest[1:]
    parts = [head] + [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in rest]
    return _sanitize("_".join(parts))


def flat_input_tensors(example_input: Any) -> tuple[list[torch.Tensor], list[str], Any, list[Any]]:
    """Split ``example_input`` into its tensor leaves and everything else.

    Returns ``(tensors, names, treespec, leaves)`` where ``leaves`` is the full leaf list of
    ``(args, kwargs)`` (non-tensor leaves are kept as constants) and ``names`` are unique ONNX
    input names, one per tensor.
    """
    args, kwargs = normalize_inputs(example_input)
    leaves_with_path, spec = pytree.tree_flatten_with_path((args, kwargs))
    leaves = [leaf for _, leaf in leaves_with_path]
    tensors: list[torch.Tensor] = []
    names: list[str] = []
    seen: set[str] = set()
    for path, leaf in leaves_with_path:
        if isinstance(leaf, torch.Tensor):
            name = _leaf_name(tuple(path), len(args))
            base, k = name, 1
            while name in seen:
                name, k = f"{base}_{k}", k + 1
            seen.add(name)
            tensors.append(leaf)
            names.append(name)
    if not tensors:
        raise InputError("example_input contains no tensor: an ONNX model needs at least one tensor input.")
    return tensors, names, spec, leaves


class _FlatModule(torch.nn.Module):
    """Positional tensors in, flat tuple of tensors out: the calling convention both exporters like."""

    def __init__(self, model: torch.nn.Module, spec: Any, leaves: list[Any]) -> None:
        super().__init__()
        self.model = model
        self._spec = spec
        self._tensor_pos = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        # Tensor slots are filled at call time; not holding the example tensors keeps them out of
        # the traced graph as constants.
        self._leaves = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        leaves = list(self._leaves)
        for pos, t in zip(self._tensor_pos, tensors):
            leaves[pos] = t
        args, kwargs = pytree.tree_unflatten(leaves, self._spec)
        return tuple(flatten_outputs(self.model(*args, **kwargs)))


def _output_names(output: Any, n: int) -> list[str]:
    """Readable output names (dict keys such as ``logits``), else ``output_<i>``.

    Mirrors the traversal order of :func:`graphprune.inputs.flatten_outputs`; if the count does not
    match (an exotic output type), generic names are used so names can never be misattributed.
    """
    names: list[str] = []

    def walk(obj: Any, prefix: str) -> None:
        if isinstance(obj, torch.Tensor):
            names.append(prefix or "output")
        elif isinstance(obj, Mapping):
            for k, v in obj.items():
                walk(v, f"{prefix}_{k}" if prefix else str(k))
        elif isinstance(obj, (tuple, list)):
            for i, v in enumerate(obj):
                walk(v, f"{prefix}_{i}" if prefix else f"output_{i}")

    try:
        walk(output, "")
    except Exception:  # naming is cosmetic; never let it break an export
        names = []
    names = [_sanitize(x) for x in names]
    if len(names) != n or len(set(names)) != n:
        return ["output" if n == 1 else f"output_{i}" for i in range(n)]
    return names


# --------------------------------------------------------------------------------------------------
# Side-effect control


@contextlib.contextmanager
def _silence_fds() -> Iterator[None]:
    """Send the process-level stdout/stderr (file descriptors 1 and 2) to a scratch file.

    Needed because the TorchScript exporter logs from C++ straight to fd 1 (e.g. it dumps the
    whole TorchScript graph when an op has no ONNX conversion), which ``redirect_stdout`` cannot
    catch. Falls back to doing nothing where the descriptors cannot be duplicated.
    """
    try:
        saved = [(fd, os.dup(fd)) for fd in (1, 2)]
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as scratch:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, _ in saved:
            os.dup2(scratch.fileno(), fd)
        try:
            yield
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence exporter warnings, log lines and progress prints (they drown the user's output)."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in _NOISY_LOGGERS]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    # torch's legacy exporter switches its C++ ONNX log on and never off again; put it back.
    is_on = getattr(torch._C, "_jit_is_onnx_log_enabled", None)
    set_on = getattr(torch._C, "_jit_set_onnx_log_enabled", None)
    log_was_on = bool(is_on()) if is_on is not None else False
    sink = io.StringIO()
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
            _silence_fds(),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        if set_on is not None:
            set_on(log_was_on)
        for lg, level in saved:
            lg.setLevel(level)


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


# --------------------------------------------------------------------------------------------------
# onnxruntime helpers


def onnx_session(path: str | os.PathLike, *, threads: int | None = None) -> Any:
    """An onnxruntime ``InferenceSession`` on the CPU provider.

    ``threads`` sets intra-op parallelism (``None``: onnxruntime's default, all physical cores).
    Graph optimisations are fully enabled, as in deployment.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; onnxruntime would reject it anyway
        t = t.float()
    return t.contiguous().numpy()


def onnx_feed(session: Any, example_input: Any) -> dict[str, np.ndarray]:
    """Map ``example_input``'s tensors onto the session's inputs.

    By name when the session uses the names :func:`export_onnx` gives (exporters may drop inputs
    the graph does not use, e.g. an all-ones attention mask), else by position.
    """
    tensors, names, _, _ = flat_input_tensors(example_input)
    wanted = [i.name for i in session.get_inputs()]
    by_name = dict(zip(names, tensors))
    if all(w in by_name for w in wanted):
        return {w: _to_numpy(by_name[w]) for w in wanted}
    if len(wanted) > len(tensors):
        raise InputError(
            f"the ONNX model expects {len(wanted)} inputs {wanted}, example_input has {len(tensors)} tensors"
        )
    return {w: _to_numpy(t) for w, t in zip(wanted, tensors)}


def run_onnx(path_or_session: str | os.PathLike | Any, example_input: Any) -> list[np.ndarray]:
    """Run an ONNX file (or an existing session) on ``example_input``; return its outputs in order."""
    session = (
        onnx_session(path_or_session) if isinstance(path_or_session, (str, os.PathLike)) else path_or_session
    )
    return list(session.run(None, onnx_feed(session, example_input)))


def compare_outputs(
    got: Sequence[np.ndarray],
    expected: Sequence[torch.Tensor],
    *,
    rtol: float,
    atol: float,
    names: Sequence[str] | None = None,
) -> list[tuple[float, float]]:
    """Compare ONNX outputs with torch outputs; raise VerificationError if any differ.

    An output passes when ``max|got - expected| <= atol + rtol * max|expected|``: the tolerance
    scales with the output's magnitude (logits of size 30 and features of size 1e-3 are both
    judged fairly), and NaNs must sit in the same places. Integer/bool outputs must match exactly.
    Returns ``(abs_err, rel_err)`` per output.
    """
    if len(got) != len(expected):
        raise VerificationError(
            f"ONNX model returned {len(got)} outputs, torch returned {len(expected)}: the export "
            "changed the output structure."
        )
    errors: list[tuple[float, float]] = []
    for i, (a, b_t) in enumerate(zip(got, expected)):
        label = f"output {i}" + (f" ({names[i]})" if names and i < len(names) else "")
        b = _to_numpy(b_t)
        a = np.asarray(a)
        if a.shape != b.shape:
            raise VerificationError(f"{label}: ONNX shape {a.shape} != torch shape {b.shape}")
        if not (np.issubdtype(b.dtype, np.floating) or np.issubdtype(b.dtype, np.complexfloating)):
            mismatched = int(np.count_nonzero(a != b))
            if mismatched:
                raise VerificationError(f"{label}: {mismatched} of {b.size} integer/bool elements differ")
            errors.append((0.0, 0.0))
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        nan_a, nan_b = np.isnan(a64), np.isnan(b64)
        if not np.array_equal(nan_a, nan_b):
            raise VerificationError(
                f"{label}: NaNs in different places (onnx has {nan_a.sum()}, torch has {nan_b.sum()})"
            )
        finite = ~nan_b
        diff = np.abs(a64[finite] - b64[finite])
        abs_err = float(diff.max()) if diff.size else 0.0
        scale = float(np.abs(b64[finite]).max()) if diff.size else 0.0
        rel_err = abs_err / max(scale, np.finfo(np.float64).tiny)
        if not abs_err <= atol + rtol * scale:  # `not <=` also catches inf/nan differences
            raise VerificationError(
                f"{label}: onnxruntime differs from torch: max abs err {abs_err:.3e}, max rel err "
                f"{rel_err:.3e} (tolerance: atol {atol:g} + rtol {rtol:g} * max|torch| {scale:.3e})"
            )
        errors.append((abs_err, rel_err))
    return errors


# --------------------------------------------------------------------------------------------------
# Export


def _export_with(
    which: Exporter,
    flat: torch.nn.Module,
    tensors: list[torch.Tensor],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    opset: int | None,
    external_data: bool,
) -> None:
    common: dict[str, Any] = dict(input_names=input_names, output_names=output_names, opset_version=opset)
    with _quiet(), torch.no_grad():
        if which == "torchscript":
            torch.onnx.export(flat, tuple(tensors), str(path), dynamo=False, **common)
        else:
            torch.onnx.export(
                flat,
                tuple(tensors),
                str(path),
                dynamo=True,
                external_data=external_data,
                verbose=False,
                optimize=True,
                **common,
            )


def _opset_of(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def export_onnx(
    model: torch.nn.Module,
    example_input: Any,
    path: str | os.PathLike,
    *,
    check: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    opset: int | None = None,
    exporter: Literal["auto", "torchscript", "dynamo"] = "auto",
) -> ExportResult:
    """Export ``model`` to ONNX at ``path`` and (``check=True``) verify it in onnxruntime.

    ``example_input`` is a tensor, a tuple of tensors or a dict of keyword inputs; its tensors
    become the ONNX inputs (named after the dict keys for keyword inputs), shapes fixed to theirs.
    ``exporter="auto"`` tries the TorchScript exporter, then the dynamo one; name one to force it.

    Raises:
        OnnxExportError: no exporter could produce a valid model that onnxruntime loads.
        VerificationError: onnxruntime's outputs differ from torch's beyond ``atol + rtol*max|torch|``.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"export_onnx needs an nn.Module, got {type(model).__name__}")
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise InputError(f"exporter must be 'auto', 'torchscript' or 'dynamo', got {exporter!r}")
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, input_names, spec, leaves = flat_input_tensors(example_input)
    order: list[Exporter] = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    external = _param_bytes(model) > _EXTERNAL_DATA_BYTES

    with eval_mode(model), no_cache(model):  # decoder LMs: the forward pass without KV cache
        flat = _FlatModule(model, spec, leaves)
        args, kwargs = normalize_inputs(example_input)
        with torch.no_grad():
            raw = model(*args, **kwargs)
        reference = flatten_outputs(raw)  # the same flattening _FlatModule applies
        if not reference:
            raise InputError("the model returned no tensor, so there is nothing to export")
        output_names = _output_names(raw, len(reference))

        failures: list[str] = []
        used: Exporter | None = None
        session = None
        for which in order:
            try:
                _export_with(which, flat, tensors, path, input_names, output_names, opset, external)
                onnx.checker.check_model(str(path))
                session = onnx_session(path)
                used = which
                break
            except Exception as exc:  # each exporter fails in its own way; report all
                msg = str(exc).strip().splitlines()
                failures.append(f"{which}: {type(exc).__name__}: {msg[0] if msg else ''}")
    if used is None or session is None:
        raise OnnxExportError(
            "could not export the model to ONNX:\n  "
            + "\n  ".join(failures)
            + "\nIf one op is unsupported, try another opset (opset=...) or exporter=...."
        )

    result = ExportResult(
        path=path,
        exporter=used,
        max_abs_err=None,
        max_rel_err=None,
        input_names=[i.name for i in session.get_inputs()],
        output_names=[o.name for o in session.get_outputs()],
        opset=_opset_of(path),
        fallback_reason="; ".join(failures) or None,
    )
    if check:
        got = session.run(None, onnx_feed(session, example_input))
        errs = compare_outputs(got, list(reference), rtol=rtol, atol=atol, names=result.output_names)
        result.per_output_errors = errs
        result.max_abs_err = max((e[0] for e in errs), default=0.0)
        result.max_rel_err = max((e[1] for e in errs), default=0.0)
    return result
