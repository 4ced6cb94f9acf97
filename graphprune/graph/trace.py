"""Front end: turn (model, example_input) into a torch.export program, with clear errors."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graphprune.errors import InputError, TraceError
from graphprune.graph.aliasing import written_inputs
from graphprune.graph.copies import private_copy
from graphprune.graph.fasttrace import fast_allowed, fast_export, note_fast_used
from graphprune.graph.inputs import flatten_outputs, forward, normalize_inputs
from graphprune.graph.lookup import submodule


@dataclass
class Traced:
    """A traced model: the program plus how its placeholders map to the model's tensors."""

    program: torch.export.ExportedProgram
    param_names: dict[str, str]  # placeholder name -> parameter/buffer/constant FQN
    user_outputs: list[str]  # names of graph nodes returned to the user
    output_shapes: list[tuple[int, ...]]
    # placeholder name -> constant the forward read from outside the model (a hook's closure, a
    # global): no module holds it, so it keeps its size, and the plan says so
    foreign: dict[str, str] = dataclasses.field(default_factory=dict)
    # placeholder name -> where a foreign constant sits in a container attribute of a module
    # (``attn.cache['cpu']``: a cache filled by an earlier forward), for the plan's boundary note
    holders: dict[str, str] = dataclasses.field(default_factory=dict)
    # made by graph.fasttrace (make_fx + module hooks) rather than torch.export
    fast: bool = False


def check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise InputError(
            f"model must be a torch.nn.Module, got {type(model).__name__}. "
            "Pass the model object itself (not its state_dict or a path); the CLI loads files for you."
        )
    return model


def _cache_configs(model: nn.Module) -> list[Any]:
    """Every config object with ``use_cache`` set that the model's modules hold: the model's, and
    the copies its stacks keep (T5's decoder stack has its own) and their sub-configs."""
    found: dict[int, Any] = {}
    for m in model.modules():
        config = getattr(m, "config", None)
        for c in [config, *(vars(config).values() if hasattr(config, "__dict__") else ())]:
            if getattr(c, "use_cache", None) is True and hasattr(c, "to_dict"):
                found.setdefault(id(c), c)
    return list(found.values())


@contextlib.contextmanager
def no_cache(model: nn.Module) -> Iterator[None]:
    """Hugging Face decoders return cache objects torch.export cannot output: trace without."""
    configs = _cache_configs(model)
    for c in configs:
        c.use_cache = False
    try:
        yield
    finally:
        for c in configs:
            c.use_cache = True


@contextlib.contextmanager
def quiet_torch_logs() -> Iterator[None]:
    """torch.export logs whole graphs on failure, fake tensors log a meta kernel's failure with its
    traceback at ERROR level (an input too small for a pooling window); our error already says
    what went wrong."""
    names = ["torch._dynamo", "torch._export", "torch.export", "torch.fx.experimental.symbolic_shapes",
             "torch._subclasses.fake_tensor"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _user_frame(exc: BaseException) -> str:
    """The innermost stack frame outside torch/graphprune: where in the user's code it failed."""
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        if not re.search(r"(site-packages|dist-packages)/(torch|graphprune)|/graphprune/", fr.filename):
            return f"{fr.filename}:{fr.lineno} ({fr.line})"
    return ""


def node_source(node: Any) -> str:
    """Where in the user's code an exported node came from: its innermost frame outside torch and
    graphprune, read from ``node.stack_trace`` ("" when the exporter recorded none)."""
    stack = getattr(node, "stack_trace", None) or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in [^\n]*\n\s*([^\n]*)', stack)
    for filename, lineno, code in reversed(frames):
        if not re.search(r"(site-packages|dist-packages)/(torch|graphprune)|/graphprune/", filename):
            return f"{filename}:{lineno} ({code.strip()})"
    return ""


def reference_outputs(model: nn.Module, example_input: Any) -> list[torch.Tensor]:
    """Run the model once; a model that rejects the input gets a clear error."""
    args, kwargs = normalize_inputs(example_input)
    try:
        with torch.no_grad(), no_cache(model):
            out = forward(model, args, kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure here is the user's input
        where = _user_frame(exc)
        raise InputError(
            f"the model rejected the example input: {type(exc).__name__}: {_first_line(exc)}"
            + (f" (at {where})" if where else "")
            + ". Pass an example_input the model accepts: a tensor, a tuple of positional inputs, "
            "or a dict of keyword inputs, with the shape and dtype used in training."
        ) from exc
    _register_dataclasses(out)
    return flatten_outputs(out)


def _register_dataclasses(output: Any) -> None:
    """Make dataclass outputs exportable: torch.export only accepts pytree-registered types.

    Registration is global and permanent (torch offers no scoped form); it only tells torch how
    to take the dataclass apart, which it then does the same way everywhere.
    """
    from torch.utils import _pytree as pytree

    if isinstance(output, torch.Tensor) or output is None:
        return
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        cls = type(output)
        if cls not in pytree.SUPPORTED_NODES:
            try:
                torch.export.register_dataclass(cls)
            except Exception:  # noqa: BLE001 - export will then explain what it cannot handle
                return
        children = [getattr(output, f.name) for f in dataclasses.fields(output)]
    elif isinstance(output, dict):
        children = list(output.values())
    elif isinstance(output, (list, tuple)):
        children = list(output)
    else:
        return
    for child in children:
        _register_dataclasses(child)


def canonical_names(model: nn.Module) -> dict[str, str]:
    """Every name of a shared (tied) tensor -> its first name, the one ``named_parameters`` gives.

    torch.export may give a tied weight (GPT-2's ``lm_head.weight`` is ``wte.weight``) one
    placeholder per name; mapping them to one name makes the rules see one tensor, so both uses
    are coupled and the tensor is sliced once.
    """
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in tensors:
        out[name] = first.setdefault(id(t), name)
    return out


def _owned(model: nn.Module, name: str) -> bool:
    """True if ``name`` is a tensor the model holds (parameter, buffer or tensor attribute).

    torch.export also lifts tensors the forward reads from elsewhere (a forward hook's closure,
    a global) as constants named ``<module>.lifted_tensor_<k>``: no module attribute holds them,
    so surgery could not slice them, and they must stay at their size like a model input.
    """
    mod_name, _, attr = name.rpartition(".")
    try:
        mod = submodule(model, mod_name)
    except AttributeError:
        return False
    return isinstance(getattr(mod, attr, None), torch.Tensor)


def container_holder(model: nn.Module, tensor: Any) -> str:
    """Where ``tensor`` sits in a dict/list/tuple attribute of a module (``attn.cache['cpu']``), or "".

    torch.export lifts such a tensor as a constant: no parameter or buffer holds it, so it cannot
    be sliced. Typically it is a cache an earlier forward filled from the parameters; naming it
    tells the user what to clear.
    """
    if not isinstance(tensor, torch.Tensor):
        return ""
    for path, mod in model.named_modules():
        for attr, val in vars(mod).items():
            if attr.startswith("_") or not isinstance(val, (dict, list, tuple)):
                continue
            items = val.items() if isinstance(val, dict) else enumerate(val)
            for key, v in items:
                if v is tensor:
                    return f"{path + '.' if path else ''}{attr}[{key!r}]"
    return ""


def trace_error(model: nn.Module, exc: BaseException) -> TraceError:
    """The real cause of a failed torch.export first, then the fix that fits that cause."""
    where = _user_frame(exc)
    cause = f"{type(exc).__name__}: {_first_line(exc)}" + (f" (at {where})" if where else "")
    scripted = _outermost_scripts(model)
    if scripted:
        what = f"module {scripted[0]!r}" if scripted[0] else "the model itself"
        more = f" (and {len(scripted) - 1} more)" if len(scripted) > 1 else ""
        return TraceError(
            f"torch.export could not trace the model because {what}{more} is TorchScript (made by "
            f"torch.jit.script or torch.jit.trace), which torch.export cannot trace ({cause}). Prune "
            "the plain nn.Module (before scripting it) and script the compact model afterwards."
        )
    text = f"{type(exc).__name__} {exc}".lower()
    if "datadependent" in text.replace("-", "").replace(" ", "") or "data-dependent" in text:
        hint = (
            "The forward's Python control flow depends on tensor values (if x.sum() > 0, .item(), "
            "data-dependent shapes): replace it by torch ops such as torch.where / torch.cond."
        )
    else:
        hint = (
            "graphprune traces with torch.export.export(model, args, kwargs, strict=False); make that "
            "call work for this model (the error above says where it stops)."
        )
    return TraceError(f"torch.export could not trace the model: {cause}. {hint}")


def _outermost_scripts(model: nn.Module) -> list[str]:
    """Paths of the TorchScript modules in ``model`` that are not inside another one."""
    found: list[str] = []
    for path, m in model.named_modules():  # parents come before their children
        inside = any(p == "" or path.startswith(p + ".") for p in found)
        if isinstance(m, torch.jit.ScriptModule) and not inside:
            found.append(path)
    return found


@contextlib.contextmanager
def _tracing(model: nn.Module) -> Iterator[None]:
    """Either tracer's surroundings: no HF cache, torch's warnings and graph logs silenced."""
    with warnings.catch_warnings(), no_cache(model), quiet_torch_logs():
        warnings.simplefilter("ignore")
        yield


def _export(model: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    with _tracing(model):
        return torch.export.export(model, args, kwargs, strict=False)


def _fast(model: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram | None:
    """The fast trace's program (graph.fasttrace), or None when it is not allowed here, refuses the
    model or fails in any way: torch.export then traces as before, with its own errors."""
    if not fast_allowed():
        return None
    try:
        with _tracing(model):
            program = fast_export(model, args, kwargs)
        if _program_output_shapes(program) is None:
            return None
    except Exception:  # noqa: BLE001 - anything unexpected: torch.export decides
        return None
    note_fast_used()
    return program


def _program_output_shapes(program: torch.export.ExportedProgram) -> list[tuple[int, ...]] | None:
    """The user outputs' shapes as ``flatten_outputs`` orders them, from the program's fake values
    (no forward run); None if the output structure cannot be rebuilt."""
    from torch.utils import _pytree as pytree

    out_node = next(n for n in program.graph.nodes if n.op == "output")
    leaves = out_node.args[0] if isinstance(out_node.args[0], (tuple, list)) else [out_node.args[0]]
    specs = program.graph_signature.output_specs
    values = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a
              for a, spec in zip(leaves, specs, strict=False) if spec.kind.name == "USER_OUTPUT"]
    try:
        tree = pytree.tree_unflatten(values, program.call_spec.out_spec)
    except Exception:  # noqa: BLE001 - the caller runs the model instead
        return None
    return [tuple(int(d) for d in t.shape) for t in flatten_outputs(tree)]


def trace(model: nn.Module, example_input: Any) -> Traced:
    """Export ``model`` (already an eval-mode copy) with torch.export, non-strict.

    Inside a call that can be retried with torch.export (``fasttrace.retried_with_export``) the
    cheaper ``fasttrace.fast_export`` is tried first; it refuses what it does not reproduce.

    The output shapes come from the program itself. The model is run eagerly only when that
    is not enough: export failed (the eager run then says whether the input is the problem, and
    registers dataclass outputs for a second try) or the output structure cannot be rebuilt.
    Skipping the eager run saves a forward pass of the whole model (seconds on an LLM). An eager
    run happens on a private copy: ``model`` may share the user's weights (``copies.shared_copy``)
    and a forward may write into its own.
    """
    args, kwargs = normalize_inputs(example_input)
    program = _fast(model, args, kwargs)
    fast = program is not None
    try:
        program = program or _export(model, args, kwargs)
    except Exception as first:  # noqa: BLE001
        reference_outputs(private_copy(model), example_input)  # InputError if the model rejects the input
        try:
            program = _export(model, args, kwargs)  # dataclass outputs are registered now
        except Exception:  # noqa: BLE001
            raise trace_error(model, first) from first
    shapes = _program_output_shapes(program)
    if shapes is None:
        shapes = [tuple(o.shape) for o in reference_outputs(private_copy(model), example_input)]
    sig = program.graph_signature
    names: dict[str, str] = {}
    foreign: dict[str, str] = {}
    holders: dict[str, str] = {}
    canonical = canonical_names(model)
    for spec in sig.input_specs:
        if spec.target is not None and spec.kind.name in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
            if _owned(model, spec.target):
                names[spec.arg.name] = canonical.get(spec.target, spec.target)
            else:  # a constant from outside the model: fixed size, like an input
                foreign[spec.arg.name] = spec.target
                holder = container_holder(model, program.constants.get(spec.target))
                if holder:
                    holders[spec.arg.name] = holder
    user_outputs = [
        spec.arg.name
        for spec in sig.output_specs
        if spec.kind.name == "USER_OUTPUT" and hasattr(spec.arg, "name")
    ]
    return Traced(program, names, user_outputs, shapes, foreign, holders, fast)


def writes_inputs(program: torch.export.ExportedProgram) -> bool:
    """True if an op of the program (or of a wrapped region) may write into one of its inputs.

    Running such a program (or the model's forward) on tensors that share the user's memory
    would write into the user's model (``embedding_renorm_`` from ``max_norm``, a
    ``weight.clamp_()`` in forward): then graphprune runs it on copies. In-place ops on the
    forward's own activations (``ReLU(inplace=True)``) do not count (graph.aliasing).
    """
    return written_inputs(program) != set()
