"""graph.fasttrace: the cheaper trace must give torch.export's program, or step aside.

Oracles: the fast program equals torch.export's node for node (op, arguments, module stack,
shapes, stack trace, signature, pytree specs, state_dict, constants, wrapped regions) on random
and hand-written micro models; compact's plan and model are the same either way; constructs it
does not reproduce are refused (torch.export traces them, with its own errors); a deliberately
wrong fast graph is caught and the call retried with torch.export, still verified.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import fuzzgen
import pytest
import rewrite_models
import torch
import transformer_models
from torch import nn
from torch._export.verifier import TrainingIRVerifier

import graphprune
from graphprune.errors import TraceError
from graphprune.graph import fasttrace
from graphprune.graph import trace as trace_mod
from graphprune.graph.copies import eval_copy
from graphprune.graph.inputs import normalize_inputs


def program_facts(ep: torch.export.ExportedProgram) -> tuple:
    """Everything of a program graphprune reads, as plain data."""
    def node(n: torch.fx.Node) -> tuple:
        v = n.meta.get("val")
        return (n.op, n.name if n.op == "placeholder" else "", str(n.target), tuple(str(a) for a in n.args),
                tuple(sorted((k, str(v)) for k, v in n.kwargs.items())),
                tuple((k, tuple(s)) for k, s in (n.meta.get("nn_module_stack") or {}).items()),
                tuple(v.shape) if isinstance(v, torch.Tensor) else None,
                str(v.dtype) if isinstance(v, torch.Tensor) else None, n.meta.get("stack_trace"))
    sig = ep.graph_signature
    return (
        [node(n) for n in ep.graph.nodes],
        [(s.kind.name, getattr(s.arg, "name", None), s.target, s.persistent) for s in sig.input_specs],
        [(s.kind.name, getattr(s.arg, "name", None), s.target) for s in sig.output_specs],
        str(ep.call_spec.in_spec), str(ep.call_spec.out_spec),
        sorted(ep.state_dict), sorted(ep.constants),
        [(name, [node(n) for n in m.graph.nodes]) for name, m in ep.graph_module.named_children()],
    )


def _both(model: nn.Module, x: Any, recorder: str = "auto") -> tuple[torch.export.ExportedProgram,
                                                                    torch.export.ExportedProgram]:
    model = eval_copy(model)
    args, kwargs = normalize_inputs(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch.export.export(model, args, kwargs, strict=False)
        fast = fasttrace.fast_export(model, args, kwargs, recorder=recorder)
    TrainingIRVerifier().check(fast)  # the fast program skips it at construction
    return ref, fast


class Mixed(nn.Module):
    """A no_grad region, a dtype cast, a shared module called twice, a tied weight, a
    non-persistent buffer, keyword and dict outputs: export's special cases in one model."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.act = nn.ReLU(inplace=True)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 6)
        self.head.weight = self.lin.weight
        self.register_buffer("shift", torch.randn(6), persistent=False)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> dict[str, Any]:
        with torch.no_grad():
            gate = torch.sigmoid(x.mean(-1, keepdim=True))
        h = self.act(self.lin(x.to(torch.float32) + 0))
        h = self.act(self.norm(h) + self.shift)
        return {"y": self.head(h) * gate, "aux": (h * scale,)}


class Constants(nn.Module):
    """Tensors that are neither parameters nor buffers: a plain attribute, one made in forward and
    a global; torch.export lifts them as constant inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = torch.linspace(0.5, 2.0, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale * torch.tensor([1.0, -1.0, 2.0, 0.5]) + _OFFSET


_OFFSET = torch.full((4,), 0.25)


class AutocastRegion(nn.Module):
    """An autocast-disabled region (timm's EfficientViT attention): torch.export wraps it."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(6, 6)
        self.k = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = torch.relu(self.q(x)), torch.relu(self.k(x))
        with torch.autocast(device_type="cpu", enabled=False):
            att = q.float() @ k.float().transpose(-1, -2)
        return att.softmax(-1) @ x

class TableIndex(nn.Module):
    """A bias table gathered by an integer index buffer (Swin's relative positions) and a one-hot
    code with its number of classes given: tagged as data-dependent shapes, but these are not, so
    the eager recorder takes them (a boolean mask it refuses)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.table = nn.Parameter(torch.randn(9, 6))
        self.register_buffer("index", torch.randint(0, 9, (5,)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        onehot = nn.functional.one_hot(self.index % 6, num_classes=6).to(x.dtype)
        return self.lin(x) + self.table[self.index] + onehot


CASES = {
    **{f"fuzz{s}": (lambda s=s: fuzzgen.build(fuzzgen.random_spec(s))) for s in (0, 3, 5, 8, 13)},
    **{f"tm_{n}": (lambda n=n: transformer_models.build(n))
       for n in ("hand_attention", "gqa_expand", "mha_cross_kdim_vdim", "tiny_lm_tied", "lstm")},
    "rewrite_tiny_vit": lambda: (rewrite_models.TinyViT(), torch.randn(2, 5, 12)),
    "mixed": lambda: (Mixed(), {"x": torch.randn(2, 3, 6), "scale": torch.randn(6)}),
    "constants": lambda: (Constants(), torch.randn(2, 4)),
    "autocast": lambda: (AutocastRegion(), torch.randn(2, 5, 6)),
    "table_index": lambda: (TableIndex(), torch.randn(2, 5, 6)),
}


# grad-mode and autocast regions: the eager recorder refuses them, make_fx records them
REGIONS = ("mixed", "autocast")


@pytest.mark.parametrize("recorder", ["auto", "eager", "make_fx"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_fast_program_equals_torch_export(name: str, recorder: str) -> None:
    torch.manual_seed(0)
    model, x = CASES[name]()
    if recorder == "eager" and name in REGIONS:
        with pytest.raises(fasttrace.FastTraceUnsupported):
            _both(model, x, recorder)
        return
    ref, fast = _both(model, x, recorder)
    assert program_facts(fast) == program_facts(ref)
    if name in REGIONS:  # the region became torch.export's wrapped region
        assert any(n.op == "get_attr" for n in fast.graph.nodes)


def test_an_eval_model_is_recorded_eagerly_and_its_program_runs_like_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The eager recorder is what ``auto`` uses for a small eval-mode model of real tensors (the
    cold-start saving), and its program computes what the model computes."""
    calls = []
    real = fasttrace.record
    monkeypatch.setattr(fasttrace, "record", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    model, x = fuzzgen.build(fuzzgen.random_spec(3))
    model = model.eval()
    fast = fasttrace.fast_export(model, (x,), {})
    assert calls == [1]
    torch.testing.assert_close(fast.module()(x), model(x))
    monkeypatch.setenv(fasttrace.TRACE_ENV, "make_fx")  # the fast trace without the recorder
    again = fasttrace.fast_export(model, (x,), {})
    assert calls == [1]
    assert program_facts(again) == program_facts(fast)


def test_fast_program_equals_torch_export_on_a_hugging_face_decoder() -> None:
    pytest.importorskip("transformers")
    import hf_models

    model, x = hf_models.build("llama")
    with trace_mod.no_cache(model):
        ref, fast = _both(model, x)
    assert program_facts(fast) == program_facts(ref)


def test_fast_program_runs_like_the_model() -> None:
    model, x = Mixed().eval(), {"x": torch.randn(2, 3, 6), "scale": torch.randn(6)}
    _, fast = _both(model, x)
    got, want = fast.module()(**x), model(**x)
    torch.testing.assert_close(got["y"], want["y"])
    torch.testing.assert_close(got["aux"][0], want["aux"][0])


class WritesInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.relu_(x))


class StoresCache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.cache = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.cache = self.lin(x)
        return self.cache * 2


class TensorIndex(nn.Module):
    """Indexing by a 0-d tensor made in the forward: torch.export turns it into ``item`` (an
    unbacked size); the fake trace cannot, and must not return a program."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)[torch.ones((), dtype=torch.long)]


class NonTensorOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        return self.lin(x), 3


class SharedModule(nn.Module):
    """One module at two paths: torch.export names it by the path the forward went through."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.inner = nn.Sequential(self.lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class CountsCalls(nn.Module):
    """Writes into its own buffer in eval mode: the eager recorder runs on the real tensors and must
    refuse before the write, not after."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.lin(x)


class ScalesConstant(nn.Module):
    """Writes into a plain tensor attribute (neither parameter nor buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = torch.ones(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.scale.mul_(2)
        return self.lin(x) * self.scale


@pytest.mark.parametrize("recorder", ["auto", "eager", "make_fx"])
@pytest.mark.parametrize("cls", [WritesInput, StoresCache, TensorIndex, NonTensorOutput, SharedModule])
def test_constructs_it_does_not_reproduce_are_refused_and_the_model_left_as_it_was(
        cls: type, recorder: str) -> None:
    model = cls().eval()
    before = dict(vars(model))
    x = torch.randn(2, 4)
    x0 = x.clone()
    expected = Exception if cls is TensorIndex else fasttrace.FastTraceUnsupported
    with pytest.raises(expected):
        fasttrace.fast_export(model, (x,), {}, recorder=recorder)
    assert vars(model).keys() == before.keys() and all(vars(model)[k] is v for k, v in before.items())
    assert torch.equal(x, x0)  # the eager recorder runs on the real input: refused before relu_


class MaskIndex(nn.Module):
    """Boolean-mask indexing: the output's shape depends on the values."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return y[y > 0]


def test_the_eager_recorder_refuses_shapes_that_depend_on_values() -> None:
    with pytest.raises(fasttrace.FastTraceUnsupported, match="values in a tensor"):
        fasttrace.fast_export(MaskIndex().eval(), (torch.randn(2, 4),), {}, recorder="eager")


@pytest.mark.parametrize("cls", [CountsCalls, ScalesConstant])
def test_the_eager_recorder_refuses_a_write_into_the_models_tensors_before_it_happens(cls: type) -> None:
    """It runs on the real tensors (make_fx writes into fake stand-ins of parameters and buffers;
    a plain tensor attribute it writes into for real, as torch.export does)."""
    model = cls().eval()
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    scale = model.scale.clone() if cls is ScalesConstant else None
    with pytest.raises(fasttrace.FastTraceUnsupported):
        fasttrace.fast_export(model, (torch.randn(2, 4),), {}, recorder="eager")
    assert all(torch.equal(v, tensors[k]) for k, v in model.state_dict().items())
    if scale is not None:
        assert torch.equal(model.scale, scale)


class LazyHook(nn.Module):
    """Installs a hook on its first call and remembers it in a flag (as Hugging Face's output
    recorders do): the flag must survive the trace, or the next call installs the hook twice."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not getattr(self, "hooked", False):
            self.lin.register_forward_hook(lambda _m, _i, out: out * 2)
            self.hooked = True
        return self.lin(x)


def test_the_model_runs_as_before_after_a_fast_trace() -> None:
    model, x = LazyHook().eval(), torch.randn(2, 4)
    twin = copy.deepcopy(model)
    ref, fast = _both(model, x)  # traces copies: now trace the model itself
    fasttrace.fast_export(model, (x,), {})
    torch.testing.assert_close(model(x), twin(x))
    assert program_facts(fast) == program_facts(ref)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return y if y.sum() > 0 else -y


def test_a_model_torch_export_rejects_gets_torch_exports_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def message() -> str:
        with pytest.raises(TraceError) as info:
            graphprune.compact(DataDependent(), torch.randn(2, 4), ratio=0.5)
        return str(info.value)

    fast_message = message()
    monkeypatch.setenv(fasttrace.TRACE_ENV, "export")
    assert fast_message == message()
    assert "torch.where" in fast_message


class _Spy:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, corrupt: bool = False) -> None:
        self.calls = 0
        self.corrupt = corrupt
        self.real = fasttrace.fast_export
        monkeypatch.setattr(trace_mod, "fast_export", self)

    def __call__(self, model: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
        self.calls += 1
        program = self.real(model, args, kwargs)
        if self.corrupt:  # a wrong graph: the first residual add computes a difference
            add = next(n for n in program.graph.nodes if n.target is torch.ops.aten.add.Tensor)
            add.target = torch.ops.aten.sub.Tensor
            program.graph_module.recompile()
        return program


def _residual() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, x = transformer_models.build("hand_attention")
    return model, x


def _compact(model: nn.Module, x: Any) -> tuple[nn.Module, dict]:
    small, plan = graphprune.compact_with_plan(model, x, ratio=0.5)
    return small, {k: v for k, v in plan.to_dict().items() if k != "notes"}


def test_compact_uses_the_fast_trace_and_gives_torch_exports_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = _residual()
    spy = _Spy(monkeypatch)
    small, plan = _compact(model, x)
    assert spy.calls >= 1
    monkeypatch.setenv(fasttrace.TRACE_ENV, "export")
    calls = spy.calls
    small_ref, plan_ref = _compact(model, x)
    assert spy.calls == calls  # GRAPHPRUNE_TRACE=export: torch.export only
    assert plan == plan_ref
    torch.testing.assert_close(small(x), small_ref(x))


def test_a_wrong_fast_graph_is_caught_and_the_call_retried_with_torch_export(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = _residual()
    monkeypatch.setenv(fasttrace.TRACE_ENV, "export")
    small_ref, plan_ref = _compact(model, x)
    monkeypatch.delenv(fasttrace.TRACE_ENV)
    spy = _Spy(monkeypatch, corrupt=True)
    small, plan = _compact(model, x)  # verify=True (the default) sees the wrong reference
    assert spy.calls >= 1
    assert plan == plan_ref
    torch.testing.assert_close(small(x), small_ref(x))
    # without the retry (the second run traced fast too) the wrong graph is an error, not a model
    monkeypatch.setattr(trace_mod, "fast_allowed", lambda: True)
    with pytest.raises(graphprune.VerificationError):
        _compact(model, x)


def test_calls_that_cannot_be_retried_trace_with_torch_export(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _Spy(monkeypatch)
    model, x = _residual()
    assert not graphprune.analyze(model, x).traced.fast  # public, not retried: torch.export
    graphprune.compact(model, x, ratio=0.5, inplace=True)  # the user's weights go: no retry
    model, x = _residual()
    graphprune.compact(model, x, ratio=0.5, importance="activation", data=(x for _ in range(2)))
    assert spy.calls == 0  # a generator of batches is consumed by the first run: no retry


class _Warns(nn.Module):
    """The residual model, warning on every forward (as user code or a library may)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        warnings.warn("from the user's forward", UserWarning, stacklevel=1)
        return self.inner(x)


def _warnings_of(model: nn.Module, x: Any) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _compact(model, x)
    return [str(w.message) for w in caught if "user's forward" in str(w.message)]


def test_a_retried_call_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # the failed fast attempt's warnings are dropped: the user sees those of the run that counts
    model, x = _residual()
    model = _Warns(model).eval()
    monkeypatch.setenv(fasttrace.TRACE_ENV, "export")
    alone = _warnings_of(model, x)
    monkeypatch.delenv(fasttrace.TRACE_ENV)
    spy = _Spy(monkeypatch, corrupt=True)
    retried = _warnings_of(model, x)
    assert spy.calls >= 1 and alone  # the retry happened, and the forward does warn
    assert retried == alone
