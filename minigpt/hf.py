"""Hugging Face GPT-2 format: weight conversion both ways.

Our parameter names are OpenAI's, so conversion is one rule: Hugging Face's GPT-2 stores its attention and MLP
weights as `Conv1D`, shape (in, out), where we use `nn.Linear`, shape (out, in); those four are transposed. The
token embedding loses (export) or gains (import) the rows that pad our vocabulary to a multiple of 64. A model
without biases exports zero biases, which computes the same function.

Nothing here imports `transformers`: the tensors and `config.json` are plain data.
"""

from __future__ import annotations

from typing import Any

import torch

from minigpt.common import UserError
from minigpt.model import GPT, ModelConfig

# Weights stored transposed in Hugging Face's Conv1D layers.
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under `GPT2LMHeadModel`'s names and layouts (contiguous copies, float as stored)."""
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to wte; Hugging Face re-ties it on load
        tensor = tensor.detach()
        if name == "wte.weight":
            tensor = tensor[: cfg.vocab_size]
        if name.endswith(TRANSPOSED):
            tensor = tensor.t()
        out[f"transformer.{name}"] = tensor.contiguous().clone()
    if not cfg.bias:  # Hugging Face's GPT-2 always has biases: zeros compute the same function
        for name, tensor in list(out.items()):
            if name.endswith(".weight") and (name.endswith(TRANSPOSED) or ".ln_" in name or "ln_f" in name):
                width = tensor.shape[1] if name.endswith(TRANSPOSED) else tensor.shape[0]
                out[name[: -len("weight")] + "bias"] = torch.zeros(width, dtype=tensor.dtype)
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 weights -> our state dict for a model of `config` (which must have bias=True)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue  # old causal-mask buffers; the tied head
        key = name.removeprefix("transformer.")
        if key.endswith(TRANSPOSED):
            tensor = tensor.t()
        if key == "wte.weight":
            padded = torch.zeros(config.padded_vocab_size, tensor.shape[1], dtype=tensor.dtype)
            padded[: tensor.shape[0]] = tensor
            tensor = padded
        out[key] = tensor.contiguous()
    out["lm_head.weight"] = out["wte.weight"]
    return out


def hf_config_dict(config: ModelConfig, **extra: Any) -> dict[str, Any]:
    """`config.json` for `GPT2LMHeadModel` with our shape."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",  # GELU with the tanh approximation, as ours
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        **extra,
    }


def config_from_hf(data: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig from a Hugging Face GPT-2 `config.json`."""
    if data.get("model_type") != "gpt2":
        raise UserError(f"only GPT-2 checkpoints can be imported, this one is {data.get('model_type')!r}")
    if data.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"unsupported activation {data['activation_function']!r}: GPT-2 uses gelu_new")
    if data.get("n_inner") not in (None, 4 * data["n_embd"]):
        raise UserError("only the standard 4x MLP width is supported")
    return ModelConfig(n_layer=data["n_layer"], n_head=data["n_head"], n_embd=data["n_embd"],
                       block_size=data.get("n_positions", data.get("n_ctx", 1024)), vocab_size=data["vocab_size"],
                       bias=True, dropout=0.0, layer_norm_eps=data.get("layer_norm_epsilon", 1e-5))
