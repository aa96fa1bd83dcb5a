"""`minigpt model`: a GPT-2 shape's parameters per component and its training FLOPs per token.

    minigpt model --preset gpt2
    minigpt model --preset tiny --n-layer 8 --seq-len 512

Nothing is allocated: the model is built on the meta device, so even gpt2-xl costs no memory.
"""

from __future__ import annotations

from minigpt.model.gpt import GPT


def parameter_table(model: GPT) -> list[tuple[str, int]]:
    """Parameters per component (embeddings, attention, MLP, LayerNorms), GPT-2 counting."""
    cfg = model.config
    groups = {"token embedding (tied head)": cfg.vocab_size * cfg.n_embd, "position embedding": 0,
              "attention": 0, "MLP": 0, "LayerNorms": 0}
    for name, p in model.named_parameters():
        if name.startswith("wpe"):
            groups["position embedding"] += p.numel()
        elif ".attn." in name:
            groups["attention"] += p.numel()
        elif ".mlp." in name:
            groups["MLP"] += p.numel()
        elif "ln_" in name:
            groups["LayerNorms"] += p.numel()
    return list(groups.items())
