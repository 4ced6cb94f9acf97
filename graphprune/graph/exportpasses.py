"""torch.export's trace settings and graph passes, written out for the fast trace (fasttrace.py).

Why here and not imported: the modules that hold them import torch.export's trace, dynamo and
sympy, about a second and a half on a process's first call, more than the eager recorder's whole
trace. Each is a copy of what torch.export does, checked by tools/trace_parity.py (the programs
must stay identical node for node); rerun it after a torch upgrade.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from graphprune.graph.eagertrace import DEVICE

# torch's files whose frames torch.export leaves out of stack traces: the modules listed by
# ``torch.fx.experimental.symbolic_shapes.uninteresting_files``, which imports each of them
# (torch.export's trace, dynamo, inductor: a second on first use) to ask for its file name
_UNINTERESTING = (
    "fx.experimental.symbolic_shapes", "export._trace", "fx.experimental.recording",
    "fx.experimental.sym_node", "fx.interpreter", "fx._symbolic_trace", "", "_compile",
    "_dynamo.eval_frame", "_inductor.sizevars", "_library.custom_ops", "_library.fake_impl",
    "_subclasses.meta_utils", "_subclasses.fake_tensor", "_logging._internal", "_logging.structured",
)


@functools.cache
def uninteresting_files() -> frozenset[str]:
    """The same file names, found without importing, with every file of the two folders torch adds
    whole (higher-order ops; dynamo's polyfills)."""
    root = os.path.dirname(torch.__file__)
    files = {"<string>"}
    for name in (*_UNINTERESTING, "_dynamo.external_utils"):
        path = os.path.join(root, *name.split(".")) if name else root
        files.add(os.path.join(path, "__init__.py") if os.path.isdir(path) else path + ".py")
    for folder in ("_higher_order_ops", os.path.join("_dynamo", "polyfills")):
        where = os.path.join(root, folder)
        if os.path.isdir(where):
            files.update(os.path.join(where, f) for f in os.listdir(where) if f.endswith(".py"))
    return frozenset(files)


@contextlib.contextmanager
def backend_kernels_off(portable: bool) -> Iterator[None]:
    """torch.export's trace setting: no cuDNN, oneDNN or NNPACK (its own context manager sits in a
    module whose import costs a second).

    cuDNN's flag is an argument of the norms (``F.layer_norm`` passes
    ``torch.backends.cudnn.enabled``), so it is always off; the other two only pick kernels below
    the recorded ops, and the eager recorder (``portable=False``) keeps them for speed.
    """
    backends = [torch.backends.cudnn]
    if portable:
        backends += [torch.backends.mkldnn, torch.backends.nnpack]
    saved = [b.set_flags(False) for b in backends]
    try:
        yield
    finally:
        for b, flags in zip(backends, saved, strict=True):
            b.set_flags(*flags)


def guard_casts(gm: torch.fx.GraphModule) -> None:
    """torch.export's ``_insert_aten_to_metadata_assert_pass``: an ``_assert_tensor_metadata``
    (dtype, device, layout of the input) before every ``aten.to``, with the cast's stack and module
    stack. Written out here because that pass's module imports sympy (0.4 s on a first call), and
    because the eager recorder keeps devices beside its meta-tensor values (``DEVICE``)."""
    casts = {torch.ops.aten.to.device, torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout}
    guard = torch.ops.aten._assert_tensor_metadata.default
    for node in list(gm.graph.nodes):
        if node.target not in casts or not isinstance(node.args[0], torch.fx.Node):
            continue
        src = node.args[0]
        if node.prev.target is guard and node.prev.args[0] == src:
            continue
        val = src.meta.get("val")
        if val is None:
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(guard, args=(src,), kwargs={
                "dtype": val.dtype, "device": src.meta.get(DEVICE, val.device), "layout": val.layout})
        new.meta.update({
            "val": None, "stack_trace": node.meta.get("stack_trace"),
            "nn_module_stack": node.meta.get("nn_module_stack"),
            "torch_fn": (f"{guard.__name__}_0", f"{guard.__class__.__name__}.{guard.__name__}"),
            "custom": src.meta.get("custom", {}),
        })


def dead_code(gm: torch.fx.GraphModule) -> None:
    """torch.export removes only dead ``detach`` and profiler records: do the same."""
    removable = {torch.ops.aten.detach.default}
    for name in ("_record_function_enter", "_record_function_enter_new"):
        op = getattr(torch.ops.profiler, name, None)
        if op is not None:
            removable.add(op.default)
    gm.graph.eliminate_dead_code(
        lambda n: not (n.op == "call_function" and n.target in removable))


class CheckedProgram(torch.export.ExportedProgram):
    """``ExportedProgram`` without the verifier run at construction.

    The fast programs are checked against torch.export's node for node instead
    (tools/trace_parity.py; tests/test_fasttrace.py runs torch's verifier on every program it
    compares). The verifier imports sympy for its symbolic-size types: 0.4 s of a first call on a
    small model. Anything torch derives from the program later (``_update``) is verified as usual.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with _lazy_graph_module():
            super().__init__(*args, **kwargs)

    def validate(self) -> None:
        return None


@contextlib.contextmanager
def _lazy_graph_module() -> Iterator[None]:
    """While an ExportedProgram is built: its graph module generates and compiles Python code
    only when first called (torch's ``_LazyGraphModule``), not in the constructor.

    graphprune never calls the program's own graph module (the reference interprets the graph;
    ``program.module()`` builds a module of its own), and that code generation was 4% of a
    small network's ``compact``. Anything that does call it, or reads ``.code``, gets the same
    code then. Where torch has no such hook the program is built as usual."""
    from torch.export import exported_program as ep
    from torch.fx._lazy_graph_module import _LazyGraphModule

    plain = getattr(ep, "_create_graph_module_for_export", None)
    if plain is None:
        yield
        return

    def lazy(root: Any, graph: torch.fx.Graph) -> torch.fx.GraphModule:
        return _LazyGraphModule(root, graph)

    ep._create_graph_module_for_export = lazy
    try:
        yield
    finally:
        ep._create_graph_module_for_export = plain


def lift_constants(gm: torch.fx.GraphModule, signature: Any, model: nn.Module) -> dict[str, Any]:
    """torch.export's constant lifting; its imports (dynamo's among them) cost a second on first
    use, so it runs only when the graph has a constant to lift."""
    if not any(n.op == "get_attr" for n in gm.graph.nodes):
        return {}
    from torch._export.non_strict_utils import _gather_constant_attrs
    from torch._export.passes.lift_constants_pass import _materialize_and_lift_constants

    return _materialize_and_lift_constants(gm, signature, _gather_constant_attrs(model))
