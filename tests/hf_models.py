"""Tiny Hugging Face transformers built from configs (random weights, no download).

One builder per architecture named in issue 3; each returns ``(model in eval mode, example input)``
with 1-2 layers, hidden size 32-64 and sequence length 8, so a compaction takes seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

SEQ = 8
VOCAB = 64


def _tokens(batch: int = 2, seq: int = SEQ, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq))


def _text(batch: int = 2) -> dict[str, torch.Tensor]:
    return {"input_ids": _tokens(batch), "attention_mask": torch.ones(batch, SEQ, dtype=torch.long)}


def _pixels(size: int, batch: int = 2) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, 3, size, size)}


def _randomize(model: nn.Module) -> nn.Module:
    """Non-trivial norm parameters and biases, so sliced ones are checked for real."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name.lower() or "bias" in name):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def vit() -> tuple[nn.Module, Any]:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, num_labels=5)
    return _randomize(ViTForImageClassification(cfg)), _pixels(16)


def deit() -> tuple[nn.Module, Any]:
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    cfg = DeiTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=5)
    return _randomize(DeiTForImageClassificationWithTeacher(cfg)), _pixels(16)


def dinov2() -> tuple[nn.Module, Any]:
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, mlp_ratio=2)
    return _randomize(Dinov2Model(cfg)), _pixels(16)


def swin() -> tuple[nn.Module, Any]:
    from transformers import SwinConfig, SwinForImageClassification

    cfg = SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                     window_size=4, mlp_ratio=2.0, num_labels=5)
    return _randomize(SwinForImageClassification(cfg)), _pixels(32)


def bert() -> tuple[nn.Module, Any]:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, num_labels=3)
    return _randomize(BertForSequenceClassification(cfg)), _text()


def distilbert() -> tuple[nn.Module, Any]:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    cfg = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                           max_position_embeddings=32, num_labels=3)
    return _randomize(DistilBertForSequenceClassification(cfg)), _text()


def roberta() -> tuple[nn.Module, Any]:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=40, num_labels=3, pad_token_id=1)
    x = _text()
    x["input_ids"] = x["input_ids"].clamp(min=2)
    return _randomize(RobertaForSequenceClassification(cfg)), x


def gpt2() -> tuple[nn.Module, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    return _randomize(GPT2LMHeadModel(cfg)), _text()


def llama() -> tuple[nn.Module, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return _randomize(LlamaForCausalLM(cfg)), _text()


def qwen2() -> tuple[nn.Module, Any]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return _randomize(Qwen2ForCausalLM(cfg)), _text()


def mistral() -> tuple[nn.Module, Any]:
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                        sliding_window=4)
    return _randomize(MistralForCausalLM(cfg)), _text()


def phi() -> tuple[nn.Module, Any]:
    from transformers import PhiConfig, PhiForCausalLM

    cfg = PhiConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=32, partial_rotary_factor=0.5)
    return _randomize(PhiForCausalLM(cfg)), _text()


def whisper_encoder() -> tuple[nn.Module, Any]:
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = WhisperConfig(num_mel_bins=8, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                        encoder_ffn_dim=64, max_source_positions=8, vocab_size=VOCAB)
    return _randomize(WhisperEncoder(cfg)), {"input_features": torch.randn(2, 8, 16)}


def segformer() -> tuple[nn.Module, Any]:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    cfg = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                          patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                          decoder_hidden_size=32, num_labels=3)
    return _randomize(SegformerForSemanticSegmentation(cfg)), _pixels(32)


def mobilevit() -> tuple[nn.Module, Any]:
    from transformers import MobileViTConfig, MobileViTForImageClassification

    cfg = MobileViTConfig(image_size=32, hidden_sizes=[16, 24, 32],
                          neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_attention_heads=2, num_labels=5)
    return _randomize(MobileViTForImageClassification(cfg)), _pixels(32)


def clip_vision() -> tuple[nn.Module, Any]:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, projection_dim=16)
    return _randomize(CLIPVisionModel(cfg)), _pixels(16)


BUILDERS: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "vit": vit,
    "deit": deit,
    "dinov2": dinov2,
    "swin": swin,
    "bert": bert,
    "distilbert": distilbert,
    "roberta": roberta,
    "gpt2": gpt2,
    "llama": llama,
    "qwen2": qwen2,
    "mistral": mistral,
    "phi": phi,
    "whisper_encoder": whisper_encoder,
    "segformer": segformer,
    "mobilevit": mobilevit,
    "clip_vision": clip_vision,
}
DECODERS = ("gpt2", "llama", "qwen2", "mistral", "phi")


def build(name: str, seed: int = 0) -> tuple[nn.Module, Any]:
    """Build ``name`` with fixed weights and input; the caller's RNG state is left alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BUILDERS[name]()
