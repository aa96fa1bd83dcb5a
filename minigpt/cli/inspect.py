"""`minigpt inspect attention | surprise | lens`: look inside a model with eval/inspect.py's pictures and tables."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from minigpt.common import UserError, atomic_path, pick_device, read_json
from minigpt.data.loader import TokenLoader
from minigpt.data.shards import check_tokenizer
from minigpt.eval.inspect import (
    PEAKED,
    POSITIONAL,
    capture_attention,
    classify_heads,
    encode_text,
    logit_lens,
    plot_attention_grid,
    plot_attention_head,
    plot_lens,
    profile_heads,
    summary,
    surprise_html,
    surprise_terminal,
    token_label,
    token_surprise,
    top_guesses,
)
from minigpt.model.gpt import GPT
from minigpt.runs.loading import load_run


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_: str):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("run", help="run folder (its latest checkpoint) or checkpoint folder")
        p.add_argument("--checkpoint", default="latest", help="latest, best, or a checkpoint name (step_00001000)")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
        return p

    p = command("attention", "attention maps of a text (layers x heads) and a table of head kinds")
    p.add_argument("--text", help="the text to draw attention maps for (none: print the head table only)")
    p.add_argument("--file", help="text file to profile heads on (default: the run's validation split)")
    p.add_argument("--samples", type=int, default=16, help="windows of text to profile heads on")
    p.add_argument("--layer", type=int, help="draw one head large, with token labels (with --head)")
    p.add_argument("--head", type=int, help="see --layer")
    p.add_argument("--out", help="PNG to write (default RUN/inspect/attention*.png)")
    p = command("surprise", "per-token loss of a text as a coloured HTML page and in the terminal")
    p.add_argument("--text", help="the text to score")
    p.add_argument("--file", help="a text file to score")
    p.add_argument("--html", help="page to write (default RUN/inspect/surprise.html)")
    p.add_argument("--top-k", type=int, default=5, help="guesses shown per token")
    p.add_argument("--no-color", action="store_true", help="plain text in the terminal")
    p = command("lens", "the logit lens: each layer's next-token guess, as a table and a heat map")
    p.add_argument("--text", required=True, help="a short text (its tokens become the columns)")
    p.add_argument("--out", help="PNG to write (default RUN/inspect/lens.png)")


def _read_text(args) -> str | None:
    if args.text is not None and args.file:
        raise UserError("give --text or --file, not both")
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise UserError(f"{path} is not a file")
        return path.read_text(encoding="utf-8", errors="replace")
    return args.text


def _sample_windows(args, model: GPT, tokenizer, run_root: Path) -> tuple[list[list[int]], str]:
    """Windows of token ids to profile heads on: from --file, else the run's validation split, in order."""
    T = model.config.block_size
    if args.file:
        if not Path(args.file).is_file():
            raise UserError(f"{args.file} is not a file")
        ids = [tokenizer.eot_id] + tokenizer.encode(Path(args.file).read_text(encoding="utf-8", errors="replace"))
        windows = [ids[i:i + T] for i in range(0, len(ids), T)][: args.samples]
        return [w for w in windows if len(w) >= 3], args.file

    config = run_root / "config.json"
    data = Path(read_json(config).get("data", "")) if config.exists() else None
    if data is None or not (data / "meta.json").exists():
        raise UserError(f"the run's data folder ({data or 'not recorded'}) was not found: give --file with text "
                        "to profile the heads on")
    check_tokenizer(data, tokenizer)
    loader = TokenLoader(data, "val", batch_size=1, seq_len=T, shuffle=False)
    windows = [x[0].tolist() for x, _ in (loader.batch(s) for s in range(min(args.samples, len(loader))))]
    return windows, f"{data} (validation, {len(windows)} windows of up to {T} tokens)"


def _out_path(given: str | None, run_root: Path, name: str) -> Path:
    return Path(given) if given else run_root / "inspect" / name


def _print_head_table(profile: torch.Tensor, kinds: list[list[str]], source: str) -> None:
    print(f"heads profiled on {source}; mean attention over queries t >= 2:")
    print(f"{'layer':>5} {'head':>4} {'previous':>9} {'first':>7} {'same':>7} {'peak':>7} {'distance':>9}  kind")
    for layer, row in enumerate(profile.tolist()):
        for head, (prev, first, same, peak, dist) in enumerate(row):
            print(f"{layer:>5} {head:>4} {prev:>9.2f} {first:>7.2f} {same:>7.2f} {peak:>7.2f} {dist:>9.1f}  "
                  f"{kinds[layer][head]}")
    print(f"(previous/first/same token: weight on that key >= {POSITIONAL}; spread: row peak < {PEAKED}; "
          "other: peaked on keys chosen by content; distance: mean tokens back)")


def _attention(args, model: GPT, tokenizer, run_root: Path) -> None:
    cfg = model.config
    if (args.layer is None) != (args.head is None):
        raise UserError("--layer and --head go together")
    if args.layer is not None:
        if not (0 <= args.layer < cfg.n_layer and 0 <= args.head < cfg.n_head):
            raise UserError(f"layer {args.layer} head {args.head} does not exist: the model has {cfg.n_layer} "
                            f"layers of {cfg.n_head} heads (counted from 0)")
        if args.text is None:
            raise UserError("--layer/--head draw a map of --text: give one")
    if args.samples < 1:
        raise UserError("--samples must be at least 1")
    windows, source = _sample_windows(args, model, tokenizer, run_root)
    if not windows:
        raise UserError("the sample text is too short to profile heads")
    profile = profile_heads(model, windows, args.device)
    kinds = classify_heads(profile)
    _print_head_table(profile, kinds, source)
    if args.text is None:
        return
    ids = encode_text(tokenizer, args.text, cfg.block_size)
    labels = [token_label(tokenizer, i) for i in ids]
    with torch.no_grad(), capture_attention(model) as maps:
        model.hidden_states(torch.tensor([ids], device=args.device))
    maps = [m[0].cpu() for m in maps]  # one (H, T, T) per layer
    if args.layer is not None:
        L, H = args.layer, args.head
        prev, first, same, _, dist = profile[L, H].tolist()
        stats = f"previous {prev:.2f}, first {first:.2f}, same {same:.2f}, {dist:.1f} tokens back"
        path = _out_path(args.out, run_root, f"attention_L{L}H{H}.png")
        plot_attention_head(maps[L][H], labels, path, f"layer {L}, head {H}: {kinds[L][H]} head\n(sample: {stats})")
    else:
        path = _out_path(args.out, run_root, "attention.png")
        shown = args.text if len(args.text) <= 70 else args.text[:69] + "…"
        plot_attention_grid(maps, labels, path, f"attention of {run_root.name} on {shown!r}", kinds)
    print(f"wrote {path}")


def _surprise(args, model: GPT, tokenizer, run_root: Path) -> None:
    text = _read_text(args)
    if text is None:
        raise UserError("give --text or --file to score")
    ids = encode_text(tokenizer, text)
    result = token_surprise(model, ids, max(args.top_k, 1))
    color = not args.no_color and sys.stdout.isatty() and "NO_COLOR" not in os.environ
    print(surprise_terminal(tokenizer, ids, result, color))
    s = summary(tokenizer, ids, result)
    print(f"\n{s['tokens']} tokens: mean loss {s['loss']:.3f} nats (perplexity {s['ppl']:.1f}), "
          f"{s['bpb']:.3f} bits per byte. Most surprising:")
    for i in result["loss"].argsort(descending=True)[:8].tolist():
        print(f"  {token_label(tokenizer, ids[i + 1], 16):>16}  loss {result['loss'][i]:5.2f}  "
              f"guesses: {top_guesses(tokenizer, result, i)}")
    path = _out_path(args.html, run_root, "surprise.html")
    with atomic_path(path) as tmp:
        tmp.write_text(surprise_html(tokenizer, ids, result, f"Surprise: {run_root.name}"), encoding="utf-8")
    print(f"wrote {path}")


def _lens(args, model: GPT, tokenizer, run_root: Path) -> None:
    ids = encode_text(tokenizer, args.text, model.config.block_size)
    with torch.no_grad():
        probs = logit_lens(model, torch.tensor([ids], device=args.device))[:, 0].float().softmax(-1).cpu()
    top_p, top_id = probs.max(-1)  # (n_layer + 1, T) each
    nxt = torch.tensor(ids[1:] + [-1])
    hits = top_id == nxt[None, :]
    top = [[token_label(tokenizer, int(i), 8) for i in row] for row in top_id]
    labels = [token_label(tokenizer, i) for i in ids]
    names = ["embeddings"] + [f"block {i}" for i in range(model.config.n_layer)]
    per_line = 7
    for s in range(0, len(ids), per_line):
        cols = range(s, min(s + per_line, len(ids)))
        print(f"{'':>12}" + "".join(f"{labels[t]:>15}" for t in cols))
        for r, name in enumerate(names):
            print(f"{name:>12}" + "".join(f"{top[r][t]:>9} {top_p[r, t]:4.0%}" + ("*" if hits[r, t] else " ")
                                          for t in cols))
        print()
    print("each cell: the top-1 next-token guess read from that layer, its probability; * = the actual next token")
    path = _out_path(args.out, run_root, "lens.png")
    plot_lens(top_p, top, hits, labels, path, f"logit lens of {run_root.name}: top-1 guess after each layer")
    print(f"wrote {path}")


def main(args) -> None:
    args.device = pick_device(args.device)
    model, tokenizer, meta = load_run(args.run, args.device, args.checkpoint)
    run_root = Path(meta["checkpoint"]).parent.parent
    {"attention": _attention, "surprise": _surprise, "lens": _lens}[args.command](args, model, tokenizer, run_root)
