"""`minigpt inspect`: look inside a trained model: attention maps, per-token surprise, the logit lens.

    minigpt inspect attention runs/tiny --text "The river flows into the sea."     # grid of maps + head table
    minigpt inspect attention runs/tiny --text "..." --layer 1 --head 2            # one map with token labels
    minigpt inspect surprise runs/tiny --file essay.txt                             # per-token loss, HTML + terminal
    minigpt inspect lens runs/tiny --text "The capital of France is"               # the logit lens

Every text starts with the end-of-text token, as every document does in the training stream (data/prepare.py), so the
first word is predicted "from a document start". Pictures and pages go to RUN/inspect/ unless --out/--html says.

Attention weights (`capture_attention`) and the residual stream (`residual_stream`) come from forward hooks: the
weights are recomputed from each attention layer's input and its c_attn, so model/gpt.py knows nothing of inspection.

Head kinds (`classify_heads`), from each head's attention averaged over a sample of text, over queries t >= 2
(at t = 0 and 1 "previous", "first" and "same" name the same keys, so those rows tell nothing apart):
    previous token   mean weight on key t - 1 >= POSITIONAL (0.5)
    first token      mean weight on key 0     >= POSITIONAL     (an "attention sink" on the window's first token)
    same token       mean weight on key t     >= POSITIONAL
    (the largest of the three wins when two pass)
    spread           none of those, and the strongest key of a row holds < PEAKED (0.3) of the weight on average
    other            none of those, but rows are peaked: the head picks keys by content, not by position
The table also gives each head's mean distance back (sum over s of w[t, s] (t - s)): local heads have a few tokens,
heads that average the whole context about t / 2.

The file is inspect.py, not inspect.py: running a script inside minigpt/ directly (python minigpt/cli.py)
puts this folder first on sys.path, and a file named inspect.py would then replace the standard library's inspect.
"""

from __future__ import annotations

import codecs
import contextlib
import html
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from minigpt.common import UserError, atomic_path
from minigpt.model.gpt import GPT

POSITIONAL = 0.5
PEAKED = 0.3
KINDS = ("previous token", "first token", "same token")
# What a head profile measures, per query row: the weight on key t - 1, on key 0, on key t; the row's largest
# weight; and the mean distance back, sum over s of w[t, s] (t - s), in tokens.
PROFILE = ("previous", "first", "same", "peak", "distance")
LOSS_MAX = 10.0  # nats: the top of the colour scale (a uniform guess over 8192 tokens is ln 8192 = 9.0)


# ----------------------------------------------------------------------------------------------------------------
# Reading the model's insides


@contextlib.contextmanager
def capture_attention(model: GPT) -> Iterator[list[torch.Tensor]]:
    """Keep the attention weights of every forward pass made inside the `with`.

    Yields a list that fills with one (B, n_head, T, T) tensor per layer per pass, in layer order: after one
    pass, maps[l] is layer l. Only passes without a KV cache are captured. A forward pre-hook on each block's
    attention takes its input and recomputes the weights beside the model (`attention_weights`); the model's own
    computation is untouched, and the hooks are removed when the `with` ends.
    """
    maps: list[torch.Tensor] = []

    def keep(attn: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x, *rest = args
        named = dict(zip(("layer", "step", "mask"), rest, strict=False)) | kwargs
        if named.get("step") is None:
            maps.append(attention_weights(attn, x, named.get("mask")))

    hooks = [block.attn.register_forward_pre_hook(keep, with_kwargs=True) for block in model.h]
    try:
        yield maps
    finally:
        for hook in hooks:
            hook.remove()


def attention_weights(attn: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim) + causal mask), (B, n_head, T, T), of a CausalSelfAttention on its input
    x (B, T, C): what its scaled_dot_product_attention weighs the values by. `mask` (B, 1, T, T), True where a
    query may attend to a key, replaces the causal mask (packed rows). No dropout: inspect a model in eval mode."""
    B, T, C = x.shape
    with torch.no_grad():
        q, k, _ = attn.c_attn(x).view(B, T, 3, attn.n_head, C // attn.n_head).permute(2, 0, 3, 1, 4).unbind(0)
        scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.size(-1))  # (B, H, T, T)
        allowed = torch.ones(T, T, dtype=torch.bool, device=x.device).tril() if mask is None else mask
        return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)  # each row sums to 1


def residual_stream(model: GPT, idx: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream (B, T, n_embd) at n_layer + 1 points: the embeddings' output, then after each block."""
    states: list[torch.Tensor] = []
    hooks = [model.h[0].register_forward_pre_hook(lambda module, args: states.append(args[0]))]
    hooks += [block.register_forward_hook(lambda module, args, out: states.append(out)) for block in model.h]
    try:
        model.hidden_states(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return states


def logit_lens(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Logits read from every point of the residual stream through ln_f and the tied head: (n_layer + 1, B, T, V).

    The last entry is the model's own output; earlier ones show what each layer "would say" if it were the last.
    """
    return torch.stack([model.logits(model.ln_f(x)) for x in residual_stream(model, idx)])


def head_sums(maps: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Per-head sums (n_layer, n_head, 5) of the PROFILE measures over the query rows t >= 2 of a batch of maps
    (one (B, H, T, T) per layer), and how many rows were summed."""
    B, H, T, _ = maps[0].shape
    if T < 3:
        return torch.zeros(len(maps), H, len(PROFILE)), 0
    q = torch.arange(T - 2, device=maps[0].device)  # rows of w[:, :, 2:], i.e. queries t = q + 2
    t = q + 2
    distance = (t[:, None] - torch.arange(T, device=t.device)[None, :]).clamp(min=0).float()  # (T - 2, T): t - s
    sums = []
    for w in maps:
        w = w[:, :, 2:]  # (B, H, T - 2, T)
        parts = (w[:, :, q, t - 1], w[:, :, q, 0], w[:, :, q, t], w.amax(-1), (w * distance).sum(-1))
        sums.append(torch.stack([p.sum(dim=(0, 2)) for p in parts], dim=-1).float().cpu())  # (H, 5)
    return torch.stack(sums), B * (T - 2)


def classify_heads(profile: torch.Tensor) -> list[list[str]]:
    """Head kinds (see the module docstring) from a profile (n_layer, n_head, 5) of the PROFILE measures."""
    kinds = []
    for layer in profile:
        row = []
        for previous, first, same, peak, _ in layer.tolist():
            positional = [previous, first, same]
            best = max(range(3), key=positional.__getitem__)
            if positional[best] >= POSITIONAL:
                row.append(KINDS[best])
            else:
                row.append("spread" if peak < PEAKED else "other")
        kinds.append(row)
    return kinds


@torch.no_grad()
def profile_heads(model: GPT, windows: list[list[int]], device: str | torch.device = "cpu") -> torch.Tensor:
    """Each head's PROFILE measures (n_layer, n_head, 5), averaged over the query rows t >= 2 of the windows."""
    cfg = model.config
    T = max(len(w) for w in windows)
    per_window = cfg.n_layer * cfg.n_head * T * T * 4  # bytes of captured weights per window
    batch = max(1, min(len(windows), 2**29 // per_window))  # keep the captured maps near 512 MiB at most
    total, count = torch.zeros(cfg.n_layer, cfg.n_head, len(PROFILE)), 0
    for i in range(0, len(windows), batch):
        group = windows[i:i + batch]
        # Windows of one length go together; a mixed group (a short last window) goes one by one.
        for chunk in [group] if len({len(w) for w in group}) == 1 else [[w] for w in group]:
            idx = torch.tensor(chunk, dtype=torch.long, device=device)
            with capture_attention(model) as maps:
                model.hidden_states(idx)
            sums, n = head_sums(maps)
            total, count = total + sums, count + n
    if count == 0:
        raise UserError("the sample is too short to profile heads: it needs windows of at least 3 tokens")
    return total / count


@torch.no_grad()
def token_surprise(model: GPT, ids: list[int], top_k: int = 5) -> dict[str, torch.Tensor]:
    """For every token after the first: its loss (nats), its probability and the model's top_k guesses.

    Texts longer than the context window are read in windows overlapping by half, so every token after the first
    window is predicted from at least half a window of context. Returns "loss", "prob" (N - 1,) and
    "top_ids", "top_probs" (N - 1, top_k), row i for the prediction of ids[i + 1].
    """
    device = model.wte.weight.device
    W, N = model.config.block_size, len(ids)
    if N < 2:
        raise UserError("the text is empty: nothing to predict")
    stride = max(W // 2, 1)
    picked, top_p, top_i = [], [], []
    done, start = 0, 0  # targets 1..done are scored
    while done < N - 1:
        n = min(W, N - 1 - start)
        logits, _ = model(torch.tensor([ids[start:start + n]], device=device))
        logp = logits[0, done - start:].float().log_softmax(-1)  # (new targets, V): rows predicting done + 1 ...
        targets = torch.tensor(ids[done + 1:start + n + 1], device=device)
        picked.append(logp.gather(1, targets[:, None])[:, 0].cpu())
        p, i = logp.topk(min(top_k, logp.shape[1]), dim=-1)
        top_p.append(p.exp().cpu())
        top_i.append(i.cpu())
        done, start = start + n, start + stride
    picked = torch.cat(picked)
    return {"loss": -picked, "prob": picked.exp(), "top_ids": torch.cat(top_i), "top_probs": torch.cat(top_p)}


# ----------------------------------------------------------------------------------------------------------------
# Tokens as text


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's share of the decoded text: a character cut between tokens goes to the token that finishes it,
    so the pieces join back into the text exactly (a token holding only part of a character gets '')."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return [decoder.decode(tokenizer.token_bytes(i)) for i in ids]


def token_label(tokenizer, token_id: int, width: int = 10) -> str:
    """A short visible label for pictures and tables: spaces as '·', newlines as '↵', specials by name."""
    if token_id == tokenizer.eot_id:
        return "<eot>"
    text = tokenizer.token_bytes(token_id).decode("utf-8", errors="backslashreplace")  # part of a character: \xe6
    text = text.replace(" ", "·").replace("\n", "↵").replace("\t", "→")
    text = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)  # no invisible controls
    return text if len(text) <= width else text[:width - 1] + "…"


def encode_text(tokenizer, text: str, limit: int | None = None) -> list[int]:
    """[eot] + the text's tokens (a document start, as in training), refused when over `limit` tokens."""
    ids = [tokenizer.eot_id] + tokenizer.encode(text)
    if len(ids) < 2:
        raise UserError("the text is empty")
    if limit is not None and len(ids) > limit:
        raise UserError(f"the text is {len(ids)} tokens (with the leading end-of-text token) but the context "
                        f"window holds {limit}: shorten it")
    return ids


# ----------------------------------------------------------------------------------------------------------------
# Pictures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    return path


def plot_attention_grid(maps: list[torch.Tensor], labels: list[str], path: Path, title: str,
                        kinds: list[list[str]] | None = None) -> Path:
    """All heads of all layers for one text: rows are layers, columns heads. maps: one (H, T, T) per layer."""
    plt = _pyplot()
    L, H = len(maps), maps[0].shape[0]
    fig, axes = plt.subplots(L, H, figsize=(2.3 * H + 1.2, 2.3 * L + 0.9), squeeze=False)
    image = None
    T = len(labels)
    for layer in range(L):
        for head in range(H):
            ax = axes[layer][head]
            image = ax.imshow(maps[layer][head].numpy(), cmap="magma", vmin=0.0, vmax=1.0)
            kind = f"\n{kinds[layer][head]}" if kinds else ""
            ax.set_title(f"layer {layer} head {head}{kind}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            if head == 0:
                ax.set_ylabel("query (token t)", fontsize=8)
            if layer == L - 1:
                ax.set_xlabel("key", fontsize=8)
    fig.suptitle(f"{title}\n{T} tokens; head kinds from the sample profile", fontsize=11)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    return _save(fig, path)


def plot_attention_head(weights: torch.Tensor, labels: list[str], path: Path, title: str) -> Path:
    """One head's (T, T) map, large, with the tokens on both axes."""
    plt = _pyplot()
    T = len(labels)
    size = max(6.0, 0.32 * T + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(weights.numpy(), cmap="magma", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(T), labels, rotation=90, fontsize=9)
    ax.set_yticks(range(T), labels, fontsize=9)
    ax.set_xlabel("key: the token attended to")
    ax.set_ylabel("query: the token attending")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.8, label="attention weight")
    return _save(fig, path)


def plot_lens(probs: torch.Tensor, top: list[list[str]], hits: torch.Tensor, labels: list[str], path: Path,
              title: str) -> Path:
    """Heat map of the top-1 probability (n_layer + 1, T), each cell labelled with that token; boxed where it is
    the token that actually comes next."""
    plt = _pyplot()
    rows, T = probs.shape
    fig, ax = plt.subplots(figsize=(max(7.0, 0.95 * T + 2.5), 0.55 * rows + 2.2))
    image = ax.imshow(probs.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for r in range(rows):
        for t in range(T):
            dark = probs[r, t] < 0.55
            color = "white" if dark else "black"
            box = dict(boxstyle="round,pad=0.25", facecolor="none", edgecolor=color) if hits[r, t] else None
            ax.text(t, r, top[r][t], ha="center", va="center", fontsize=8.5, color=color, bbox=box,
                    fontweight="bold" if hits[r, t] else "normal")
    ax.set_xticks(range(T), labels, rotation=60, ha="right", fontsize=9)
    ax.set_yticks(range(rows), ["embeddings"] + [f"after block {i}" for i in range(rows - 1)], fontsize=9)
    ax.set_xlabel("input position (its token); cells: the top-1 next-token guess, boxed = the actual next token")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="probability of the top-1 token", pad=0.01)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------------------
# Surprise as HTML and in the terminal

# Colour ramp from no surprise to LOSS_MAX nats: (r, g, b) for HTML, xterm-256 codes for the terminal.
_RAMP_RGB = [(255, 255, 255), (255, 245, 190), (254, 217, 118), (253, 141, 60), (227, 26, 28), (150, 0, 38)]
_RAMP_ANSI = [231, 230, 229, 228, 221, 215, 209, 203, 197, 160]


def _rgb(loss: float) -> str:
    x = min(max(loss / LOSS_MAX, 0.0), 1.0) * (len(_RAMP_RGB) - 1)
    i = min(int(x), len(_RAMP_RGB) - 2)
    a, b, f = _RAMP_RGB[i], _RAMP_RGB[i + 1], x - i
    r, g, bl = (round(a[c] + (b[c] - a[c]) * f) for c in range(3))
    return f"#{r:02x}{g:02x}{bl:02x}"


def _ansi(loss: float) -> int:
    return _RAMP_ANSI[min(int(max(loss, 0.0) / LOSS_MAX * len(_RAMP_ANSI)), len(_RAMP_ANSI) - 1)]


def _pct(p: float) -> str:
    return f"{p:.1%}" if p >= 0.001 else f"{100 * p:.0e}%"  # 0.0% would hide how small it is


def top_guesses(tokenizer, result: dict[str, torch.Tensor], i: int) -> str:
    return ", ".join(f"'{token_label(tokenizer, int(t), 16)}' {_pct(p)}"
                     for t, p in zip(result["top_ids"][i].tolist(), result["top_probs"][i].tolist(), strict=True))


def summary(tokenizer, ids: list[int], result: dict[str, torch.Tensor]) -> dict[str, float]:
    loss = result["loss"]
    n_bytes = max(len(tokenizer.decode_bytes(ids[1:])), 1)
    return {"tokens": len(loss), "loss": float(loss.mean()), "ppl": math.exp(float(loss.mean())),
            "bpb": float(loss.sum()) / math.log(2) / n_bytes}


def surprise_html(tokenizer, ids: list[int], result: dict[str, torch.Tensor], title: str) -> str:
    """A self-contained page: each token coloured by its loss, the model's guesses in its tooltip."""
    texts = token_texts(tokenizer, ids)[1:]  # the leading end-of-text token is context, not shown
    spans = []
    for i, text in enumerate(texts):
        tip = (f"{token_label(tokenizer, ids[i + 1], 24)}: loss {result['loss'][i]:.2f} nats, "
               f"p = {_pct(float(result['prob'][i]))}\nmodel's guesses: {top_guesses(tokenizer, result, i)}")
        cut = "" if text else ' class="cut"'  # part of a character: an empty box that still shows its tooltip
        spans.append(f'<span{cut} style="background:{_rgb(float(result["loss"][i]))}" '
                     f'title="{html.escape(tip, quote=True)}">{html.escape(text)}</span>')
    s = summary(tokenizer, ids, result)
    legend = "".join(f'<span style="background:{_rgb(v)}">&nbsp;{v:g}&nbsp;</span>'
                     for v in (0, 1, 2, 4, 6, 8, LOSS_MAX))
    worst = result["loss"].argsort(descending=True)[:10].tolist()
    rows = "".join(f"<tr><td>{i + 1}</td><td><code>{html.escape(token_label(tokenizer, ids[i + 1], 24))}</code></td>"
                   f"<td>{result['loss'][i]:.2f}</td><td>{html.escape(top_guesses(tokenizer, result, i))}</td></tr>"
                   for i in worst)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; padding: 0 1em; color: #222; }}
.text {{ font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; line-height: 1.9;
         font-size: 15px; border: 1px solid #ddd; padding: 1em; }}
.text span:hover {{ outline: 1px solid #222; }}
.text span.cut {{ display: inline-block; min-width: 0.4em; height: 1.1em; vertical-align: text-bottom; }}
.legend span {{ font-family: ui-monospace, monospace; font-size: 13px; border: 1px solid #eee; }}
table {{ border-collapse: collapse; font-size: 14px; }} td, th {{ padding: 2px 10px; text-align: left; }}
tr:nth-child(even) {{ background: #f6f6f6; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{s['tokens']} tokens predicted; mean loss {s['loss']:.3f} nats per token (perplexity {s['ppl']:.1f}),
{s['bpb']:.3f} bits per byte. The first token is predicted from a document start (end-of-text).
Hover over a token for its loss and the model's top guesses.</p>
<p class="legend">loss in nats: {legend}</p>
<div class="text">{''.join(spans)}</div>
<h2>Most surprising tokens</h2>
<table><tr><th>#</th><th>token</th><th>loss</th><th>model's guesses</th></tr>{rows}</table>
</body></html>
"""


def surprise_terminal(tokenizer, ids: list[int], result: dict[str, torch.Tensor], color: bool) -> str:
    """The text with each token's background coloured by its loss (plain text when color is False)."""
    texts = token_texts(tokenizer, ids)[1:]
    if not color:
        return "".join(texts)
    out = []
    for text, loss in zip(texts, result["loss"].tolist(), strict=True):
        start = f"\x1b[38;5;16;48;5;{_ansi(loss)}m"
        out.append("\n".join(f"{start}{line}\x1b[0m" if line else "" for line in text.split("\n")))
    return "".join(out)
