"""A cheaper trace than ``torch.export.export(strict=False)``, packaged as an ExportedProgram.

Why: the trace is 70-80 % of a cold ``compact`` call. Non-strict export is make_fx (pre-dispatch,
fake tensors) plus a torch-function handler on every torch call, module stacks recorded by
patching ``nn.Module.__call__`` through an fx tracer, a second fakification of every parameter,
tensor metadata and several passes. Here the same make_fx trace runs on its own; module stacks
come from forward pre/post hooks written into ``torch.fx.traceback.current_meta``, which fx copies
onto every node it creates. The graph is then wrapped in a genuine ``ExportedProgram`` (graph
signature with parameter/buffer FQNs, in/out pytree specs, state_dict, constants), so the rest of
graphprune cannot tell the difference.

What this trace does not cover it refuses (``FastTraceUnsupported``) and the caller uses
torch.export: tensors the forward reads from outside the parameters and buffers, non-tensor
inputs or outputs, writes into inputs/parameters/buffers, module attributes assigned during the
forward, any call that is not a plain ATen op (control-flow operators, autocast, symbolic sizes).
``GRAPHPRUNE_TRACE=export`` skips it entirely (tests, bug reports).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import operator
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils import _pytree as pytree

from graphprune.graph.aliasing import view_base, written_arguments
from graphprune.graph.eagertrace import REGION_MARKERS, EagerUnsupported, record
from graphprune.graph.exportpasses import (
    CheckedProgram,
    backend_kernels_off,
    dead_code,
    guard_casts,
    lift_constants,
    uninteresting_files,
)
from graphprune.graph.kernelskip import ValuesRead

TRACE_ENV = "GRAPHPRUNE_TRACE"
# the eager recorder's limit on parameters + buffers (bytes); bigger models use make_fx
EAGER_MAX_BYTES = 1 << 30
T = TypeVar("T")


class FastTraceUnsupported(Exception):
    """The model uses something the fast trace does not reproduce exactly: use torch.export."""


def _trace_setting() -> str:
    return os.environ.get(TRACE_ENV, "").strip().lower()


def fast_trace_enabled() -> bool:
    """False when ``GRAPHPRUNE_TRACE=export`` asks for torch.export only."""
    return _trace_setting() not in ("export", "torch.export")


def _recorder_wanted(recorder: str) -> str:
    """``recorder`` ("auto", "eager", "make_fx"); "auto" becomes "make_fx" under
    ``GRAPHPRUNE_TRACE=make_fx`` (the fast trace without the eager recorder: bug reports, and the
    before/after of ``tools/cold_time.py --tools gp,gp-makefx``)."""
    if recorder not in ("auto", "eager", "make_fx"):
        raise ValueError(f"recorder must be 'auto', 'eager' or 'make_fx', got {recorder!r}")
    if recorder == "auto" and _trace_setting() in ("make_fx", "makefx"):
        return "make_fx"
    return recorder


def _class_name(m: nn.Module) -> str:
    cls = type(m)
    return f"{cls.__module__}.{cls.__qualname__}"


@contextlib.contextmanager
def _module_stacks(model: nn.Module) -> Iterator[None]:
    """Record ``nn_module_stack`` (torch.export's format) in fx's current node meta.

    Keys are ``L__self__<path>`` with ``@k`` for the k-th repeated call of one module, values
    ``(path, qualified class name)``; the root is included, as torch.export does.
    """
    from torch.fx import traceback as fx_traceback

    paths: dict[int, tuple[str, nn.Module, tuple[str, str]]] = {}  # id -> path, module, stack entry
    for path, mod in model.named_modules():
        paths.setdefault(id(mod), (path, mod, (path, _class_name(mod))))
    calls: dict[str, int] = {}
    saved: list[Any] = []

    def pre(mod: nn.Module, _args: Any) -> None:
        path, _, entry = paths[id(mod)]
        n = calls.get(path, 0)
        calls[path] = n + 1
        key = f"L__self__{path}@{n}" if n else f"L__self__{path}"
        meta = fx_traceback.get_current_meta()
        old = meta.get("nn_module_stack")
        saved.append(old)
        stack = dict(old) if old else {}
        stack[key] = entry
        meta["nn_module_stack"] = stack

    def post(_mod: nn.Module, _args: Any, _out: Any) -> None:
        old = saved.pop() if saved else None
        meta = fx_traceback.get_current_meta()
        if old is None:
            meta.pop("nn_module_stack", None)
        else:
            meta["nn_module_stack"] = old

    handles = []
    try:
        for _path, mod, _entry in paths.values():
            handles.append(mod.register_forward_pre_hook(pre, prepend=True))
            handles.append(mod.register_forward_hook(post, always_call=True))
        with fx_traceback.preserve_node_meta():  # restores fx's own meta dict on exit
            fx_traceback.current_meta = _StackMeta(fx_traceback.current_meta)
            yield
    finally:
        for h in handles:
            h.remove()


class _Frames:
    """The frames that created one node, filtered as torch.export filters them (frames of a
    ``forward``, of ``torch/__init__.py`` or of a registered anchor, outside torch's
    uninteresting files), innermost last.

    fx's own stack traces symbolise and format every frame (~80) of every node, a third of the
    trace; walking the frames costs microseconds, and the few kept are formatted after the trace.
    """

    __slots__ = ("frames",)

    def __init__(self, skip: frozenset[str], anchors: set[tuple[str, str]]) -> None:
        out = []
        f = sys._getframe(2)
        while f is not None:
            code = f.f_code
            name, filename = code.co_name, code.co_filename
            if (name == "forward" or filename.endswith("torch/__init__.py")
                    or (filename, name) in anchors) and filename not in skip:
                out.append((filename, f.f_lineno, name))
            f = f.f_back
        out.reverse()
        self.frames = out

    def __contains__(self, _text: str) -> bool:  # fx looks for its gradient-accumulation marker
        return False

    def __str__(self) -> str:  # fx formats graphs (an error inside make_fx) before we convert
        return self.text() or ""

    def strip(self) -> str:
        return str(self).strip()

    def text(self) -> str | None:
        summary = traceback.StackSummary.from_list(
            [traceback.FrameSummary(f, n, name) for f, n, name in self.frames])
        return "".join(summary.format()).strip() or None


class _StackMeta(dict):
    """fx's current node meta whose "stack_trace" is the frames of whoever asks (fx's create_node,
    for every node it makes): torch.export's stack traces without their cost."""

    def __init__(self, base: dict) -> None:
        super().__init__(base)
        from torch.fx import proxy

        self.skip = uninteresting_files()
        self.anchors = getattr(proxy, "_STACK_TRACE_ANCHORS", set())

    def get(self, key: str, default: Any = None) -> Any:
        if key == "stack_trace":
            return _Frames(self.skip, self.anchors)
        return super().get(key, default)


def _format_stacks(gm: torch.fx.GraphModule) -> None:
    """Turn the raw frames recorded during the trace into torch.export's stack-trace strings.

    The ops of one line of the user's code share their frames: each distinct stack is
    formatted once (traceback's formatting reads every line's source again)."""
    texts: dict[tuple[tuple[str, int, str], ...], str | None] = {}
    for n in gm.graph.nodes:
        raw = n.meta.get("stack_trace")
        if isinstance(raw, _Frames):
            key = tuple(raw.frames)
            if key not in texts:
                texts[key] = raw.text()
            text = texts[key]
            if text:
                n.meta["stack_trace"] = text
            else:
                del n.meta["stack_trace"]


def _attribute_snapshot(model: nn.Module) -> list[tuple[nn.Module, dict, dict, dict, dict]]:
    return [(m, dict(vars(m)), dict(m._parameters), dict(m._buffers), dict(m._modules))
            for m in model.modules()]


def _tensors_in(value: Any) -> list[Any]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v)]
    return []


def _restore_changed(snapshot: list[tuple[nn.Module, dict, dict, dict, dict]], traced: set[int]) -> bool:
    """Undo what the forward did to module attributes during the trace; True if it stored a
    tensor other than the traced parameters and buffers (state the graph would not show, such as
    a cache filled by the forward: torch.export then decides).

    As torch.export: rebound attributes get their old value back, and attributes the forward
    added stay (a library may set a flag on its first call and install hooks with it, which stay
    too), except those holding tensors, which are the trace's fake stand-ins. ``nn.RNN`` keeps a
    list of its weights that functional_call's swap refreshes with the stand-ins (``traced``):
    restored, harmless.
    """
    suspicious = False
    for m, attrs, params, bufs, mods in snapshot:
        for now, before in ((vars(m), attrs), (m._parameters, params), (m._buffers, bufs),
                            (m._modules, mods)):
            if now.keys() == before.keys() and all(now[k] is v for k, v in before.items()):
                continue
            for k in list(now):
                v = now[k]
                if k in before and before[k] is v:
                    continue
                old = {id(t) for t in _tensors_in(before.get(k))}
                tensors = _tensors_in(v)
                if any(id(t) not in traced and id(t) not in old for t in tensors):
                    suspicious = True
                if k in before:
                    now[k] = before[k]
                elif tensors:
                    del now[k]
            for k, v in before.items():
                if k not in now:
                    now[k] = v
    return suspicious


_PASSTHROUGH = {operator.getitem}


def _check_graph(gm: torch.fx.GraphModule) -> None:
    """Refuse graphs torch.export would have turned into something else (or rejected)."""
    for n in gm.graph.nodes:
        if n.op == "call_function":
            if n.target in REGION_MARKERS:
                continue  # made into a wrapped region below, as torch.export does
            if not isinstance(n.target, torch._ops.OpOverload) and n.target not in _PASSTHROUGH:
                raise FastTraceUnsupported(f"unsupported call {n.target}")
            if n.target in _PASSTHROUGH:
                continue
            if "nn_module_stack" not in n.meta:
                raise FastTraceUnsupported(f"no module stack for {n.name}")
            if n.target is torch.ops.aten.index.Tensor and any(
                    isinstance(i, torch.fx.Node) and getattr(i.meta.get("val"), "ndim", 1) == 0
                    for i in n.args[1]):
                raise FastTraceUnsupported("indexing by a 0-d tensor (torch.export rewrites it)")
            if any(view_base(v).op == "placeholder" for v in written_arguments(n)):
                raise FastTraceUnsupported(f"{n.target} writes into an input of the graph")
        elif n.op in ("call_module", "call_method"):
            raise FastTraceUnsupported(f"unsupported node {n.op} {n.target}")


def _forward_names(model: nn.Module, n_args: int) -> list[str]:
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names[:n_args]


def _rename_placeholders(gm: torch.fx.GraphModule, names: list[str]) -> list[str]:
    """Give the placeholders torch.export's names (``p_conv_weight``, ``b_bn_running_mean``, ``x``)."""
    olds = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(olds) != len(names):
        raise FastTraceUnsupported("placeholder count differs from the flattened inputs")
    return [_renamed(gm, old, name).name for old, name in zip(olds, names, strict=True)]


def _renamed(gm: torch.fx.GraphModule, old: torch.fx.Node, name: str) -> torch.fx.Node:
    """``old`` (a placeholder) renamed ``name`` in place (fx uniquifies it, as for a new node)."""
    old._rename(name)
    old.target = old.name  # a placeholder's target is its argument name
    return old


def _name_constants(gm: torch.fx.GraphModule, signature: Any) -> None:
    """Lifted constants' placeholders get torch.export's names: ``c_`` + their target."""
    from torch.export.graph_signature import TensorArgument

    nodes = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    for spec in signature.input_specs:
        if spec.kind.name != "CONSTANT_TENSOR" or not isinstance(spec.arg, TensorArgument):
            continue
        new = _renamed(gm, nodes[spec.arg.name], _state_name("c", spec.target))
        spec.arg = TensorArgument(name=new.name)


def _state_name(prefix: str, target: str) -> str:
    """torch.export's placeholder name for a parameter ("p"), buffer ("b") or constant ("c")."""
    return f"{prefix}_{_ident(target.replace('.', '_')).lower()}"


def _ident(text: str) -> str:
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in text)
    return out if out and not out[0].isdigit() else f"_{out}"


def _eager_refusal(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """Why the eager recorder may not run this model (None: it may). It runs the real forward:
    only for an eval-mode model (a training forward updates its buffers) of real tensors no bigger
    than ``EAGER_MAX_BYTES`` (a big model's real forward costs more than make_fx's fake one)."""
    if any(m.training for m in model.modules()):
        return "a module in training mode"
    size = 0
    for t in state.values():
        if t.device.type == "meta":
            return "tensors on the meta device"
        size += t.numel() * t.element_size()
    return f"parameters and buffers over {EAGER_MAX_BYTES >> 20} MiB" if size > EAGER_MAX_BYTES else None


def _attempt(model: nn.Module, traced: set[int], run: Callable[[], torch.fx.GraphModule],
             portable: bool = True) -> torch.fx.GraphModule:
    """One trace under torch.export's settings, module attributes restored afterwards.

    Raises ``FastTraceUnsupported`` if the forward stored a tensor in a module attribute (state the
    graph would not show: torch.export decides), ``EagerUnsupported`` if the eager recorder
    refused the model.
    """
    from torch._export.utils import _compiling_state_context

    snapshot = _attribute_snapshot(model)
    grad = torch.is_grad_enabled()
    try:
        # backend kernels off, so ops keep their portable form and arguments;
        # torch.compiler.is_exporting() true, which user code may test
        with backend_kernels_off(portable), _compiling_state_context(), _module_stacks(model):
            gm = run()
        _format_stacks(gm)
    finally:
        torch._C._set_grad_enabled(grad)
        if _restore_changed(snapshot, traced):
            raise FastTraceUnsupported("the forward stored a tensor in a module attribute")
    return gm


def fast_export(model: nn.Module, args: tuple, kwargs: dict,
                recorder: str = "auto") -> torch.export.ExportedProgram:
    """The eager recorder (graph.eagertrace) or make_fx (pre-dispatch, fake), with module-stack
    hooks, wrapped as torch.export would.

    ``recorder``: "auto" (the eager recorder where it is allowed and accepts the model, else
    make_fx), "eager" or "make_fx" (one of them only: tests and tools/trace_parity.py).
    Raises ``FastTraceUnsupported`` (or whatever the trace raised) when the result might differ
    from torch.export's; the caller then runs torch.export.
    """
    from torch._export.verifier import TrainingIRVerifier
    from torch.export.exported_program import ModuleCallEntry, ModuleCallSignature
    from torch.export.graph_signature import (
        ExportGraphSignature,
        InputKind,
        InputSpec,
        OutputKind,
        OutputSpec,
        TensorArgument,
    )
    from torch.fx import traceback as fx_traceback

    if any(isinstance(m, torch.jit.ScriptModule) for m in model.modules()):
        raise FastTraceUnsupported("TorchScript modules")
    seen: set[int] = set()
    for _name, m in model.named_modules(remove_duplicate=False):
        if id(m) in seen:  # torch.export names a shared module by the path the forward used
            raise FastTraceUnsupported("a module held at two paths")
        seen.add(id(m))
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    state = {**params, **buffers}
    if len(state) != len(params) + len(buffers):
        raise FastTraceUnsupported("a name is both a parameter and a buffer")
    user_flat, in_spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    if not all(isinstance(t, torch.Tensor) for t in user_flat):
        raise FastTraceUnsupported("a non-tensor input")
    plain = (torch.Tensor, nn.Parameter)
    if any(type(t) not in plain for t in [*user_flat, *state.values()]):
        raise FastTraceUnsupported("a tensor subclass")
    names = list(state)
    n_state = len(names)
    out_spec: list[Any] = []
    traced: set[int] = set()

    def flat_fn(*flat: Any, swap: bool = True) -> tuple:
        traced.update(id(t) for t in flat)
        a, kw = pytree.tree_unflatten(list(flat[n_state:]), in_spec)
        if swap:  # make_fx's fake stand-ins take the place of the parameters and buffers
            out = torch.func.functional_call(model, dict(zip(names, flat[:n_state], strict=True)), a, kw)
        else:  # the recorder runs on the real ones
            out = model(*a, **kw)
        leaves, spec = pytree.tree_flatten(out)
        if not all(isinstance(t, torch.Tensor) for t in leaves):
            raise FastTraceUnsupported("a non-tensor output")
        out_spec.append(spec)
        return tuple(leaves)

    recorder = _recorder_wanted(recorder)
    gm = None
    if recorder != "make_fx":
        why = _eager_refusal(model, state)
        if why is None:
            def eager(skip: bool) -> torch.fx.GraphModule:
                return _attempt(model, traced, lambda: record(
                    lambda *flat: flat_fn(*flat, swap=False), [*state.values(), *user_flat],
                    fx_traceback.get_current_meta, skip), portable=False)

            try:
                try:
                    gm = eager(skip=True)
                except ValuesRead:  # it needed numbers a skipped kernel did not compute
                    out_spec.clear()
                    gm = eager(skip=False)
            except EagerUnsupported as exc:
                why = str(exc)
        if gm is None and recorder == "eager":
            raise FastTraceUnsupported(f"the eager recorder refused the model: {why}")
    if gm is None:
        def by_make_fx() -> torch.fx.GraphModule:
            from torch._dispatch.python import enable_python_dispatcher
            from torch.fx.experimental.proxy_tensor import make_fx

            with enable_python_dispatcher():
                return make_fx(flat_fn, tracing_mode="fake", pre_dispatch=True,
                               _allow_non_fake_inputs=True)(*state.values(), *user_flat)
        out_spec.clear()
        gm = _attempt(model, traced, by_make_fx)
    dead_code(gm)
    _check_graph(gm)
    guard_casts(gm)  # torch.export's guard before every aten.to

    persistent = set(model.state_dict(keep_vars=True))
    fwd = _forward_names(model, len(args))
    user_names = []
    for i, (path, _leaf) in enumerate(pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))[0]):
        key = path[1] if len(path) > 1 else None
        if path[0].idx == 0 and isinstance(key, pytree.SequenceKey) and key.idx < len(fwd) and len(path) == 2:
            user_names.append(fwd[key.idx])
        elif path[0].idx == 1 and isinstance(key, pytree.MappingKey) and len(path) == 2:
            user_names.append(_ident(str(key.key)))
        else:
            user_names.append(f"arg{i}")
    wanted = [_state_name("p", n) for n in params] + [_state_name("b", n) for n in buffers]
    got = _rename_placeholders(gm, wanted + user_names)

    inputs = [InputSpec(InputKind.PARAMETER, TensorArgument(name=g), target=n, persistent=None)
              for g, n in zip(got, params, strict=False)]
    inputs += [InputSpec(InputKind.BUFFER, TensorArgument(name=g), target=n, persistent=n in persistent)
               for g, n in zip(got[len(params):], buffers, strict=False)]
    inputs += [InputSpec(InputKind.USER_INPUT, TensorArgument(name=g), target=None)
               for g in got[n_state:]]
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    results = out_node.args[0] if isinstance(out_node.args[0], (tuple, list)) else (out_node.args[0],)
    if not all(isinstance(r, torch.fx.Node) and r.op != "placeholder" for r in results) \
            or len(set(results)) != len(results):
        raise FastTraceUnsupported("an output that is an input, or returned twice")
    outputs = [OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(name=r.name), target=None) for r in results]
    signature = ExportGraphSignature(input_specs=inputs, output_specs=outputs)
    # tensors made inside the forward (``torch.tensor([...])``) become inputs, as torch.export lifts them
    lifted = lift_constants(gm, signature, model)
    _name_constants(gm, signature)
    if any(n.op == "call_function" and n.target in REGION_MARKERS for n in gm.graph.nodes):
        from torch._export.passes.replace_autocast_with_hop_pass import replace_autocast_with_hop_pass
        from torch._export.passes.replace_set_grad_with_hop_pass import replace_set_grad_with_hop_pass

        gm, signature = replace_set_grad_with_hop_pass(gm, signature)
        gm, signature = replace_autocast_with_hop_pass(gm, signature)
    for sub in gm.modules():  # as torch.export: inputs and outputs belong to no module and line
        if isinstance(sub, torch.fx.GraphModule):
            for n in sub.graph.nodes:
                if n.op in ("placeholder", "output"):
                    n.meta.pop("nn_module_stack", None)
                    n.meta.pop("stack_trace", None)
    # no gm.recompile(): the ExportedProgram compiles its own graph module from this graph

    state_dict = {n: t for n, t in state.items() if n in params or n in persistent}
    constants = {n: t for n, t in buffers.items() if n not in persistent}
    constants.update(lifted)
    call = ModuleCallSignature(inputs=[], outputs=[], in_spec=in_spec, out_spec=out_spec[-1],
                               forward_arg_names=fwd + list(kwargs))
    return CheckedProgram(
        root=gm, graph=gm.graph, graph_signature=signature, state_dict=state_dict,
        range_constraints={}, module_call_graph=[ModuleCallEntry(fqn="", signature=call)],
        example_inputs=(tuple(args), dict(kwargs)), constants=constants,
        verifiers=[TrainingIRVerifier])


# Where the fast trace may be used: only inside a call that can be retried with torch.export
# (``retried_with_export``). The list records which trace each trace() call used.
_SCOPE: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("graphprune_trace", default=None)
_EXPORT_ONLY = "export-only"


def fast_allowed() -> bool:
    """True inside a retryable call, unless ``GRAPHPRUNE_TRACE=export`` or ``export_only()``."""
    scope = _SCOPE.get()
    return scope is not None and _EXPORT_ONLY not in scope and fast_trace_enabled()


def note_fast_used() -> None:
    """trace() used the fast trace: a failure of the enclosing call is retried with torch.export."""
    scope = _SCOPE.get()
    if scope is not None:
        scope.append("fast")


@contextlib.contextmanager
def export_only() -> Iterator[None]:
    """Trace with torch.export only inside this block (a call that cannot be retried)."""
    token = _SCOPE.set([_EXPORT_ONLY])
    try:
        yield
    finally:
        _SCOPE.reset(token)


def _replay(caught: list[warnings.WarningMessage]) -> None:
    """Show held-back warnings now, each at the place it was raised (the user's line)."""
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def retried_with_export(fn: Callable[..., T]) -> Callable[..., T]:
    """Let ``fn``'s traces use the fast trace; if ``fn`` then fails in any way (analysis, surgery,
    verification), run it once more with torch.export, so a fast-trace bug never costs coverage.

    Only the outermost decorated call retries; nested ones run inside its scope. A call with
    ``inplace=True`` (the user's weights are replaced as slicing goes) or with a one-shot iterator
    argument (calibration batches from a generator, consumed by the first run) cannot be retried:
    it traces with torch.export only.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        if _SCOPE.get() is not None:
            return fn(*args, **kwargs)
        one_shot = any(isinstance(v, Iterator) for v in (*args, *kwargs.values()))
        if kwargs.get("inplace") or one_shot:
            with export_only():
                return fn(*args, **kwargs)
        log: list[str] = []
        token = _SCOPE.set(log)
        try:
            # held back until the call succeeds, so that a retry does not warn the user twice
            with warnings.catch_warnings(record=True) as caught:
                result = fn(*args, **kwargs)
        except Exception:
            if "fast" not in log:
                _replay(caught)
                raise
        else:
            _replay(caught)
            return result
        finally:
            _SCOPE.reset(token)
        with export_only():
            return fn(*args, **kwargs)

    return wrapper
