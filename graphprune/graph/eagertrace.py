"""Record one eager forward, on the real tensors, as the graph ``make_fx(pre_dispatch=True)`` builds.

Why: make_fx runs every op twice over (a fake-tensor kernel to learn the output's metadata, a
proxy to record it) and, on its first use in a process, pays for torch.export's imports,
dynamo's and fake-tensor kernels' warm-up: most of a first ``compact`` on a small network,
several times Torch-Pruning's whole call, which reads the graph off one eager forward. Here the
forward runs as the user's code runs it, on the real CPU/GPU kernels (except that large CPU
convolutions and matrix products return zeros: ``kernelskip.py``); a dispatch mode at the
pre-dispatch key (the level torch.export records: ``conv2d``, ``linear``, ``batch_norm``, before
autograd and decompositions) writes each op into an fx graph, with its output's metadata (a meta
tensor, and the device beside it), the module stack and the frames fx's hooks leave in
``current_meta``.

The result is the graph make_fx would give for the same run, node for node (up to the strides
of size-1 dimensions, which real and fake kernels choose differently) (``tools/trace_parity.py``
checks it). Whatever this recorder cannot reproduce exactly it refuses with ``EagerUnsupported``,
before the op runs, so the caller falls back to make_fx: an op writing into a tensor it does not own
(an input, a parameter, a buffer or a constant: the run shares the user's memory), a value read
back from a tensor (``item()``, ``bool(t)``: data-dependent control flow), grad-mode or autocast
regions, higher-order operators and tensor subclasses.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch._dispatch.python import enable_python_dispatcher
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.fx.experimental.proxy_tensor import PreDispatchTorchFunctionMode, ProxyTorchDispatchMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

from graphprune.graph.aliasing import storage_ptr, written_values
from graphprune.graph.kernelskip import Skipping, ValuesRead, reads_values, worth_skipping


class EagerUnsupported(Exception):
    """The forward did something the recorder does not reproduce: trace with make_fx instead."""


_PLAIN = (torch.Tensor, nn.Parameter)
# node.meta key of a recorded tensor's device (its ``val`` is a meta tensor)
DEVICE = "graphprune_device"
# ops whose result (a Python value, or an output's shape) depends on the values in a tensor: on real
# tensors they would bake this input's answer into the graph; make_fx refuses them, or torch.export
# makes them symbolic (``bool(t)`` is ``is_nonzero``, which carries no tag)
_DATA_TAGS = {torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape}
# calls that open or close a grad-mode or autocast region: make_fx records them as nodes, which
# torch.export's passes turn into wrapped regions
REGION_MARKERS = {torch._C._set_grad_enabled, torch.amp.autocast_mode._enter_autocast,
                  torch.amp.autocast_mode._exit_autocast}


class _Regions(PreDispatchTorchFunctionMode):
    """Refuses grad-mode and autocast regions, which only a torch-function mode sees (autocast
    only tells make_fx's own mode, hence the subclass; its ``__init__`` is not needed).

    It also makes the forward take the paths it takes under make_fx, whose own torch-function
    mode is active: library code that checks for one (``nn.MultiheadAttention``'s fused fast
    path) then behaves the same in both traces. And it sees the forward read numbers outside the
    dispatcher (``tolist()``), which a recording that skipped kernels cannot give it
    (``kernelskip.py``). ``recorder`` is set after construction (``__init__`` is not called).
    """

    recorder: _Recorder

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in REGION_MARKERS:
            raise EagerUnsupported("a grad-mode or autocast region")
        rec = self.recorder
        if rec.skipping is not None and rec.skipping.skipped and not rec.dispatching and reads_values(func):
            raise ValuesRead(f"{getattr(func, '__name__', func)} read a tensor's numbers")
        return func(*args, **(kwargs or {}))


class _Recorder(ProxyTorchDispatchMode):
    """A pre-dispatch mode that records instead of proxying.

    torch only accepts a proxy mode on the pre-dispatch key, so this subclasses it; none of the
    parent's proxying runs (``__torch_dispatch__`` is replaced, ``__init__`` is not called).
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:  # no dynamo wrapper (and no dynamo import) per op
        return False

    def __init__(self, graph: torch.fx.Graph, root: nn.Module, owned: set[int],
                 meta: Callable[[], dict], skipping: Skipping | None = None) -> None:
        TorchDispatchMode.__init__(self, torch._C.DispatchKey.PreDispatch)
        self.enter_stack: list[Any] = []
        self._mode_key = torch._C._TorchDispatchModeKey.PROXY
        self.graph = graph
        self.root = root
        self.nodes: Any = WeakTensorKeyDictionary()  # tensor -> node that made it
        self.owned = owned  # storages (storage_ptr) of the inputs, parameters and buffers
        self.constants: dict[int, torch.fx.Node] = {}
        self.meta = meta
        self.grad = torch.is_grad_enabled()
        # per op: (target recorded, node name, output shape may depend on values, writes an argument)
        self.facts: dict[Any, tuple[Any, str, bool, bool]] = {}
        self.skipping = skipping  # heavy CPU kernels return zeros (kernelskip.py); None: all run
        self.dispatching = False  # inside __torch_dispatch__ (graphprune's own tensor calls)

    # -- values -------------------------------------------------------------------------------
    def value(self, node: torch.fx.Node, t: torch.Tensor) -> torch.Tensor:
        """``t``'s metadata as a meta tensor (shape, strides, dtype): ``node``'s ``meta["val"]``.

        make_fx stores fake tensors, which also carry the device; making one needs a
        FakeTensorMode, whose construction imports dynamo (1.2 s on a first call). graphprune
        reads shapes and dtypes; the device goes to ``meta[DEVICE]``.
        """
        node.meta[DEVICE] = t.device
        return _meta_like(t)

    def track(self, t: torch.Tensor, node: torch.fx.Node) -> None:
        self.nodes[t] = node

    def _arg(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if type(value) not in _PLAIN:
                raise EagerUnsupported(f"a tensor subclass ({type(value).__name__})")
            node = self.nodes.get(value)
            return node if node is not None else self.constant(value)
        if isinstance(value, (list, tuple)):
            return type(value)(self._arg(v) for v in value)
        if isinstance(value, dict):
            return {k: self._arg(v) for k, v in value.items()}
        return value

    def constant(self, t: torch.Tensor) -> torch.fx.Node:
        """A tensor no op made and no input is (``torch.tensor([...])``, a plain tensor attribute,
        a global): a ``_tensor_constantN`` attribute of the graph module, as make_fx stores it."""
        node = self.constants.get(id(t))
        if node is None:
            i = len(self.constants)
            name = f"_tensor_constant{i}"
            setattr(self.root, name, t)
            node = self._node("get_attr", name, (), {})
            self.constants[id(t)] = node
        return node

    def _node(self, op: str, target: Any, args: tuple, kwargs: dict,
              name: str | None = None) -> torch.fx.Node:
        node = self.graph.create_node(op, target, args, kwargs, name)
        current = self.meta()
        stack = current.get("nn_module_stack")
        if stack is not None:
            node.meta["nn_module_stack"] = dict(stack)
        frames = current.get("stack_trace")
        if frames:
            node.meta["stack_trace"] = frames
        return node

    # -- checks before an op runs ---------------------------------------------------------------
    def _facts(self, func: torch._ops.OpOverload) -> tuple[Any, str, bool, bool]:
        """What the checks and the node need to know of ``func``, worked out once per op."""
        found = self.facts.get(func)
        if found is None:
            aten = torch.ops.aten
            target = aten.lift_fresh_copy.default if func is aten.lift_fresh.default else func
            data = func is aten.is_nonzero.default or not _DATA_TAGS.isdisjoint(func.tags)
            found = self.facts[func] = (target, self.graph._target_to_str(target.overloadpacket.__name__),
                                        data, func._schema.is_mutable)
        return found

    def _check(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict,
               data: bool, writes: bool) -> None:
        if torch.is_grad_enabled() != self.grad:
            raise EagerUnsupported("a grad-mode region")
        if data and (func is torch.ops.aten.is_nonzero.default or not _static_shape(func, args, kwargs)):
            raise EagerUnsupported(f"{func} depends on the values in a tensor")
        for t in written_values(func._schema, args, kwargs) if writes else ():
            if not isinstance(t, torch.Tensor) or t not in self.nodes or storage_ptr(t) in self.owned:
                raise EagerUnsupported(f"{func} writes into a tensor the forward does not own")

    # -- the op ---------------------------------------------------------------------------------
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if not isinstance(func, torch._ops.OpOverload):
            raise EagerUnsupported(f"unsupported call {func}")
        if func is torch.ops.prim.device.default:
            return func(*args, **kwargs)
        self.dispatching = True
        try:
            target, name, data, writes = self._facts(func)
            self._check(func, args, kwargs, data, writes)
            node_args = self._arg(args)
            node_kwargs = self._arg(kwargs)
            node = self._node("call_function", target, node_args, node_kwargs, name)
            if self.skipping is not None and worth_skipping(func, args, kwargs):
                with torch._C._DisablePythonDispatcher(), self.skipping:  # zeros, below autograd
                    out = func(*args, **kwargs)
            else:
                with torch._C._DisablePythonDispatcher():  # the op itself runs at C++ speed
                    out = func(*args, **kwargs)
            self._outputs(out, node)
        finally:
            self.dispatching = False
        return out

    def _outputs(self, out: Any, node: torch.fx.Node) -> None:
        if isinstance(out, torch.Tensor):
            node.meta["val"] = self.value(node, out)
            self.track(out, node)
        elif isinstance(out, (tuple, list)):
            node.meta["val"] = type(out)(_meta_like(o) if isinstance(o, torch.Tensor) else o for o in out)
            for i, o in enumerate(out):
                item = self._node("call_function", operator.getitem, (node, i), {})
                if isinstance(o, torch.Tensor):
                    item.meta["val"] = self.value(item, o)
                    self.track(o, item)
                elif isinstance(o, (tuple, list)):
                    raise EagerUnsupported("a nested tuple output")
        elif out is None or isinstance(out, (int, float, bool)):
            node.meta["val"] = out
        else:
            raise EagerUnsupported(f"an op output of type {type(out).__name__}")


def _static_shape(func: Any, args: tuple, kwargs: dict) -> bool:
    """An op tagged as having a data-dependent output shape whose shape, for these arguments, is
    not: ``t[idx]`` with integer index tensors (the indices' shape; only boolean masks depend on
    the values) and ``one_hot`` with ``num_classes`` given."""
    if func is torch.ops.aten.index.Tensor and len(args) >= 2:
        return all(i is None or (isinstance(i, torch.Tensor) and i.dtype not in (torch.bool, torch.uint8))
                   for i in args[1])
    if func is torch.ops.aten.one_hot.default:
        classes = args[1] if len(args) > 1 else kwargs.get("num_classes", -1)
        return isinstance(classes, int) and classes >= 0
    return False


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def record(fn: Callable[..., tuple], inputs: list[torch.Tensor],
           meta: Callable[[], dict], skip: bool = True) -> torch.fx.GraphModule:
    """The fx graph of ``fn(*inputs)`` (a flat tuple of tensors), recorded as it runs.

    ``meta()`` is the dict fx would copy onto each new node (``nn_module_stack``, ``stack_trace``).
    Placeholders are named as make_fx names them (``arg0_1`` ...); the output is a tuple.
    ``skip``: heavy CPU kernels return zeros (``kernelskip.py``); a forward that then reads
    numbers, or fails, raises ``ValuesRead``: the caller records it again with ``skip=False``
    (in a fresh context: the module-stack hooks count the calls of each module).
    """
    if any(type(t) not in _PLAIN for t in inputs):
        raise EagerUnsupported("a tensor subclass")
    if any(t.device.type == "meta" for t in inputs):
        raise EagerUnsupported("tensors on the meta device")
    owned = {storage_ptr(t) for t in inputs if t.untyped_storage().nbytes()}
    skipping = Skipping() if skip else None
    try:
        return _record(fn, inputs, meta, owned, skipping)
    except (EagerUnsupported, ValuesRead):  # a refusal does not depend on the numbers
        raise
    except Exception as exc:
        if skipping is None or not skipping.skipped:
            raise
        raise ValuesRead(f"the forward failed on skipped kernels' zeros: {exc}") from exc


def _record(fn: Callable[..., tuple], inputs: list[torch.Tensor], meta: Callable[[], dict],
            owned: set[int], skipping: Skipping | None) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    root = nn.Module()
    rec = _Recorder(graph, root, owned, meta, skipping)
    for i, t in enumerate(inputs):
        node = graph.placeholder(f"arg{i}_1")
        node.meta["val"] = rec.value(node, t)
        rec.track(t, node)
    regions = _Regions.__new__(_Regions)
    regions.recorder = rec
    # the Python dispatcher routes the pre-dispatch key to Python modes
    with enable_python_dispatcher(), regions, rec:
        outs = fn(*inputs)
    results = []
    for o in outs:
        if not isinstance(o, torch.Tensor):
            raise EagerUnsupported("a non-tensor output")
        results.append(rec.nodes.get(o) or rec.constant(o))
    graph.output(tuple(results))
    # not compiled: nothing runs this module (the program compiles its own from the graph), and
    # generating its code is ~5% of a small network's call
    return _LazyGraphModule(root, graph)
