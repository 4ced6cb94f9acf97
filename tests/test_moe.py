"""Mixtures of experts whose weights are stacked in one parameter and picked by a router.

Current transformers (Mixtral, Qwen3-MoE, OLMoE...) keep every expert's weights in one tensor
(``gate_up_proj``: experts x 2*intermediate x hidden) and, on their batched path, gather each
routed token's expert with ``weight[expert_ids]`` before a ``bmm``. The product is a layer's
weight product, not two activations meeting, so the intermediate width is prunable: the same
positions in every expert (one dense stack), the expert dim whole. Widths in such a stack stay
multiples of 16 bytes under ``round_to="auto"`` (torch's grouped matrix-product kernel, the
transformers default on CPU, requires it).
"""

from __future__ import annotations

import pytest
import torch
from oracles import check_dead_channels, check_ratio_zero_identity
from torch import nn
from torch.nn import functional as F

import graphprune

HIDDEN, INTER, EXPERTS, TOP_K = 16, 24, 4, 2


class StackedExperts(nn.Module):
    """Routed experts, weights stacked, computed per routed token with gathered weights."""

    def __init__(self, hidden: int, inter: int, experts: int, top_k: int) -> None:
        super().__init__()
        self.router = nn.Linear(hidden, experts, bias=False)
        self.gate_up = nn.Parameter(torch.randn(experts, 2 * inter, hidden) / hidden**0.5)
        self.down = nn.Parameter(torch.randn(experts, hidden, inter) / inter**0.5)
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        tokens = x.reshape(-1, h)
        weights, ids = self.router(tokens).softmax(dim=-1).topk(self.top_k, dim=-1)
        picked = tokens.repeat_interleave(self.top_k, dim=0)  # (tokens * top_k, hidden)
        ids = ids.reshape(-1)
        up = torch.bmm(self.gate_up[ids], picked.unsqueeze(-1)).squeeze(-1)
        gate, up = up.chunk(2, dim=-1)
        y = torch.bmm(self.down[ids], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
        y = (y * weights.reshape(-1, 1)).view(-1, self.top_k, h).sum(dim=1)
        return y.view(b, n, h)


class TinyMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.moe = StackedExperts(HIDDEN, INTER, EXPERTS, TOP_K)
        self.head = nn.Linear(HIDDEN, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.moe(self.norm(h))
        return self.head(h.mean(dim=1))


def _model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return TinyMoE().eval(), torch.randn(2, 5, 8)


def test_expert_width_is_pruned_in_every_expert_and_verified() -> None:
    model, x = _model()
    small = graphprune.compact(model, x, ratio=0.5, round_to=1)  # verify=True: the reference agrees
    assert small.moe.gate_up.shape == (EXPERTS, INTER, HIDDEN)  # 2 * 12 of 2 * 24: gate and up alike
    assert small.moe.down.shape == (EXPERTS, HIDDEN, INTER // 2)
    assert small.moe.router.weight.shape == (EXPERTS, HIDDEN)  # the experts all stay


def test_ratio_zero_is_the_identity() -> None:
    check_ratio_zero_identity(*_model())


def test_dead_expert_channels_removed_without_changing_outputs() -> None:
    model, x = _model()
    small = check_dead_channels(model, x, 0.5, rtol=1e-5, round_to=1)
    assert small.moe.down.shape[2] < INTER


@pytest.mark.parametrize(("dtype", "multiple"), [(torch.float32, 4), (torch.float64, 2)])
def test_auto_keeps_stacked_widths_multiples_of_16_bytes(dtype: torch.dtype, multiple: int) -> None:
    model, x = _model()
    model, x = model.to(dtype), x.to(dtype)
    for ratio in (0.3, 0.45, 0.6):
        small = graphprune.compact(model, x, ratio=ratio)
        width = small.moe.down.shape[2]
        assert width < INTER and width % multiple == 0, (ratio, width)
        exact = graphprune.compact(model, x, ratio=ratio, round_to=1).moe.down.shape[2]
        assert abs(width - exact) <= multiple // 2, (ratio, width, exact)


def test_position_embedding_is_not_a_stack() -> None:
    """A (1, tokens, C) parameter is no stack of weights: the hidden width is cut exactly."""

    class WithPositions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(8, 30)
            self.pos = nn.Parameter(torch.randn(1, 5, 30))
            self.fc = nn.Linear(30, 30)
            self.head = nn.Linear(30, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.fc(self.embed(x) + self.pos)).mean(dim=1))

    torch.manual_seed(0)
    model, x = WithPositions().eval(), torch.randn(2, 5, 8)
    small = graphprune.compact(model, x, ratio=0.3, prune_hidden=True)
    assert small.pos.shape[2] == 21  # round(30 * 0.7) exactly, not aligned to 4


def _hf_moe(model_type: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.for_model(
        model_type, vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=32, num_experts=4, num_local_experts=4, num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.set_experts_implementation("batched_mm")  # weights gathered per token, then bmm
    ids = torch.randint(0, 64, (2, 6))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_transformers_moe_experts_pruned_and_reloadable(model_type: str, tmp_path) -> None:
    model, x = _hf_moe(model_type)
    experts = model.model.layers[0].mlp.experts
    width = experts.down_proj.shape[2]
    small = graphprune.compact(model, x, ratio=0.3)
    pruned = small.model.layers[0].mlp.experts
    assert pruned.down_proj.shape[2] < width and pruned.down_proj.shape[2] % 4 == 0
    assert pruned.gate_up_proj.shape[1] == 2 * pruned.down_proj.shape[2]
    assert pruned.gate_up_proj.shape[0] == experts.gate_up_proj.shape[0]  # every expert stays
    with torch.no_grad():
        logits = small(**x).logits
    # transformers' own save and load, with its default (grouped) experts path on reload
    small.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**x).logits, logits, rtol=1e-4, atol=1e-5)


class GroupedExperts(nn.Module):
    """Routed experts run by ``F.grouped_mm``: tokens sorted by expert, offsets per expert."""

    def __init__(self, hidden: int, inter: int, experts: int) -> None:
        super().__init__()
        self.router = nn.Linear(hidden, experts, bias=False)
        self.up = nn.Parameter(torch.randn(experts, hidden, inter) / hidden**0.5)
        self.down = nn.Parameter(torch.randn(experts, inter, hidden) / inter**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        weight, expert = self.router(tokens).softmax(dim=-1).max(dim=-1)
        order = torch.sort(expert).indices
        n = self.up.shape[0]
        offs = torch.cumsum(torch.histc(expert.float(), bins=n, min=0, max=n - 1), 0).to(torch.int32)
        h = F.grouped_mm(tokens[order], self.up, offs=offs)
        y = F.grouped_mm(F.gelu(h), self.down, offs=offs) * weight[order, None]
        return torch.zeros_like(tokens).index_copy(0, order, y).view_as(x)


def test_grouped_mm_experts_prune_their_width() -> None:
    """bf16: torch's meta kernel for grouped_mm (what tracing runs) takes no other dtype."""
    torch.manual_seed(0)
    moe = GroupedExperts(HIDDEN, 32, EXPERTS)
    model = nn.Sequential(nn.Linear(8, HIDDEN), moe, nn.Linear(HIDDEN, 3)).eval().to(torch.bfloat16)
    x = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    small, plan = graphprune.compact_with_plan(model, x, 0.5)  # verify=True: the reference agrees
    assert small[1].up.shape == (EXPERTS, HIDDEN, 16)  # 16 of 32: a multiple of 8 bf16 values
    assert small[1].down.shape == (EXPERTS, 16, HIDDEN)
    assert small[1].router.weight.shape == (EXPERTS, HIDDEN)
