"""Inspection: captured attention is real attention, a hand-built positional model is recognised, the logit lens
ends at the model's logits, surprise matches the loss, and each `minigpt inspect` command draws something."""

from __future__ import annotations

import math
import re
from html import unescape
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minigpt.cli import main as cli_main
from minigpt.eval.inspect import (
    capture_attention,
    classify_heads,
    logit_lens,
    profile_heads,
    residual_stream,
    surprise_html,
    surprise_terminal,
    token_surprise,
    token_texts,
)
from minigpt.model.gpt import GPT, ModelConfig
from minigpt.runs.loading import load_run
from minigpt.train.train import TrainConfig, train


def random_model(**shape) -> GPT:
    torch.manual_seed(0)
    cfg = dict(n_layer=3, n_head=4, n_embd=32, block_size=24, vocab_size=60)
    return GPT(ModelConfig(**{**cfg, **shape})).eval()


def test_captured_attention_rows_sum_to_one_and_are_causal():
    model = random_model()
    idx = torch.randint(0, 60, (2, 12))
    with torch.no_grad(), capture_attention(model) as maps:
        model(idx)
    assert len(maps) == 3 and all(m.shape == (2, 4, 12, 12) for m in maps)
    for w in maps:
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 12))
        assert (w.triu(diagonal=1) == 0).all() and (w >= 0).all()


def test_capturing_leaves_the_output_unchanged_and_switches_back():
    model = random_model()
    idx = torch.randint(0, 60, (3, 20))
    with torch.no_grad():
        fast, _ = model(idx)
        with capture_attention(model) as maps:
            slow, _ = model(idx)
        again, _ = model(idx)
    torch.testing.assert_close(slow, fast, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, fast)
    assert len(maps) == 3  # the pass after the `with` was not captured


@pytest.mark.parametrize("packed_rows", [False, True], ids=["causal", "doc_ids"])
def test_captured_weights_times_values_are_the_attention_output(packed_rows):
    """The weights are recomputed beside the model: multiplied by the values they must give what the model's own
    scaled_dot_product_attention gave, with the plain causal mask and with packed documents' block mask."""
    model = random_model()
    idx = torch.randint(0, 60, (2, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12]) if packed_rows else None
    seen = []  # (input, output) of each attention layer
    hooks = [block.attn.register_forward_hook(lambda m, args, out: seen.append((args[0], out))) for block in model.h]
    with torch.no_grad(), capture_attention(model) as maps:
        model(idx, doc_ids=doc_ids)
    for hook in hooks:
        hook.remove()
    if packed_rows:  # no weight crosses from the first document of row 0 into the second
        assert (maps[0][0, :, 5:, :5] == 0).all() and (maps[0][1, :, 5:, :5] > 0).all()
    for block, w, (x, out) in zip(model.h, maps, seen, strict=True):
        B, T, C = x.shape
        with torch.no_grad():
            v = block.attn.c_attn(x)[..., 2 * C:].view(B, T, 4, C // 4).transpose(1, 2)  # (B, H, T, D)
            y = (w @ v).transpose(1, 2).reshape(B, T, C)
            torch.testing.assert_close(block.attn.c_proj(y), out, rtol=1e-5, atol=1e-5)


def positional_model(all_previous: bool = False) -> GPT:
    """Weights set by hand so each head's target is known. Token embeddings and every linear layer are zero except
    the query/key weights, so every block passes its input through unchanged and the residual stream is just the
    position embedding: position t is the angle t * theta, written as (cos, sin) in a zero-mean pattern so that
    ln_1 only rescales it (by sqrt 2). With k_s = (cos s theta, sin s theta) in each head's first two dimensions:
        layer 0 head 0: q_t rotated back by one step, so q . k peaks at s = t - 1     -> previous token
        layer 0 head 1: q_t = k_t, peak at s = t                                   -> same token
        layer 1 head 0: q constant (a bias) pointing at angle 0, peak at s = 0      -> first token
        layer 1 head 1: q = 0, every key scores the same                           -> spread
    `all_previous`: every head of both layers is built like layer 0 head 0.
    A scale of 200 makes the peaks sharp: the nearest rival key scores 200 (1 - cos theta) = 15 lower.
    """
    T, C = 16, 8
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=C, block_size=T, vocab_size=10)).eval()
    theta, scale = 2 * math.pi / T, 200.0
    rotate_back = torch.tensor([[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]])
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0 if "ln" in name and name.endswith("weight") else 0.0)
        angle = torch.arange(T) * theta
        c, s = angle.cos(), angle.sin()
        model.wpe.weight.copy_(torch.stack([c, s, -c, -s, c, s, -c, -s], dim=1))
        for layer, block in enumerate(model.h):
            w, b = block.attn.c_attn.weight, block.attn.c_attn.bias  # rows: q (0..C), k (C..2C), v (2C..3C)
            for head in range(2):
                q, k = 4 * head, C + 4 * head
                w[k:k + 2, 0:2] = torch.eye(2)
                if all_previous:
                    w[q:q + 2, 0:2] = scale * rotate_back
                elif layer == 0:
                    w[q:q + 2, 0:2] = scale * (rotate_back if head == 0 else torch.eye(2))
                elif head == 0:
                    b[q] = scale * 1.5
    return model


def test_a_hand_built_positional_model_is_classified_as_built():
    model = positional_model()
    windows = torch.randint(0, 10, (3, 16)).tolist()
    with torch.no_grad(), capture_attention(model) as maps:
        model(torch.tensor(windows))
    t = torch.arange(1, 16)
    assert (maps[0][:, 0, t, t - 1] > 0.999).all()  # really the previous token, at every position
    profile = profile_heads(model, windows)
    assert classify_heads(profile) == [["previous token", "same token"], ["first token", "spread"]]
    assert profile[0, 0, 0] > 0.999 and profile[0, 1, 2] > 0.999 and profile[1, 0, 1] > 0.99
    assert profile[1, 1, 3] < 0.2  # uniform rows: the largest weight is 1 / (t + 1)
    assert profile[0, 0, 4] == pytest.approx(1.0, abs=1e-3) and profile[0, 1, 4] == pytest.approx(0.0, abs=1e-3)
    assert profile[1, 1, 4] == pytest.approx(sum(t / 2 for t in range(2, 16)) / 14, rel=1e-4)  # uniform: t / 2 back


def test_a_model_whose_every_head_looks_back_one_token_is_classified_so():
    model = positional_model(all_previous=True)
    windows = torch.randint(0, 10, (3, 16)).tolist()
    with torch.no_grad(), capture_attention(model) as maps:
        model(torch.tensor(windows))
    t = torch.arange(1, 16)
    assert all((m[:, :, t, t - 1] > 0.999).all() for m in maps)
    assert classify_heads(profile_heads(model, windows)) == [["previous token"] * 2] * 2


def test_logit_lens_ends_at_the_models_logits():
    model = random_model()
    idx = torch.randint(0, 60, (2, 10))
    with torch.no_grad():
        lens = logit_lens(model, idx)
        logits, _ = model(idx)
        states = residual_stream(model, idx)
    assert lens.shape == (4, 2, 10, 60) and len(states) == 4
    torch.testing.assert_close(lens[-1], logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(states[0], model.wte(idx) + model.wpe(torch.arange(10)))


def test_surprise_is_the_models_loss_also_past_the_context_window():
    model = random_model(block_size=16)
    ids = torch.randint(0, 60, (40,)).tolist()
    short = token_surprise(model, ids[:16], top_k=3)
    with torch.no_grad():
        _, loss = model(torch.tensor([ids[:15]]), torch.tensor([ids[1:16]]))
    assert short["loss"].shape == (15,) and short["top_ids"].shape == (15, 3)
    assert short["loss"].mean().item() == pytest.approx(loss.item(), rel=1e-5)
    long = token_surprise(model, ids)  # windows of 16 overlapping by 8: the first 15 targets are the same
    assert long["loss"].shape == (39,) and torch.isfinite(long["loss"]).all()
    torch.testing.assert_close(long["loss"][:15], short["loss"])
    with torch.no_grad():  # a target past the first window is predicted from the 8..15 tokens before it
        logits, _ = model(torch.tensor([ids[8:24]]))
    expected = -F.log_softmax(logits[0, 15], -1)[ids[24]]
    assert long["loss"][23].item() == pytest.approx(expected.item(), rel=1e-5)
    assert (long["top_probs"][:, 0] >= long["prob"] - 1e-6).all()


# ----------------------------------------------------------------------------------------------------------------
# On a trained run


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_shards) -> Path:
    """A 2-layer model trained for a few seconds on the fixture's shards."""
    cfg = TrainConfig(run_dir=str(tmp_path_factory.mktemp("inspect") / "run"), data=str(tiny_shards),
                      model=ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32), batch_size=8, max_steps=30,
                      warmup_steps=3, lr=3e-3, log_every=10, eval_every=1000, eval_batches=2, checkpoint_every=1000,
                      sample_prompt="", device="cpu", seed=5)
    return train(cfg)


TEXT = "The river flows north into the sea, past the old city."


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_cli_attention_grid_and_one_head(run, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    assert cli_main(["inspect", "attention", str(run), "--text", TEXT, "--samples", "4", "--out", str(grid)]) == 0
    out = capsys.readouterr().out
    assert "validation" in out and out.count(" head ") + out.count("kind") >= 1
    assert sum(kind in out for kind in ("previous token", "first token", "same token", "spread", "other")) >= 1
    width, height = png_size(grid)
    assert width > 300 and height > 300 and grid.stat().st_size > 10_000
    one = tmp_path / "one.png"
    assert cli_main(["inspect", "attention", str(run), "--text", TEXT, "--layer", "1", "--head", "0",
                     "--out", str(one)]) == 0
    assert min(png_size(one)) > 400 and one.stat().st_size > 10_000


def test_cli_attention_profiles_a_file(run, tmp_path, capsys, wiki_sample):
    assert cli_main(["inspect", "attention", str(run), "--file", str(wiki_sample), "--samples", "3"]) == 0
    out = capsys.readouterr().out
    assert str(wiki_sample) in out and len([line for line in out.splitlines() if line.strip()[:1].isdigit()]) == 4
    png = tmp_path / "a.png"  # --text draws, --file profiles: both at once
    assert cli_main(["inspect", "attention", str(run), "--file", str(wiki_sample), "--samples", "2", "--text", TEXT,
                     "--out", str(png)]) == 0
    assert png.stat().st_size > 10_000


def test_cli_surprise_writes_an_escaped_page(run, tmp_path, capsys):
    page = tmp_path / "s.html"
    text = 'Tags like <b>bold</b> & "quotes" stay text: naïve café.'
    assert cli_main(["inspect", "surprise", str(run), "--text", text, "--html", str(page), "--no-color"]) == 0
    out = capsys.readouterr().out
    assert text in out and "\x1b[" not in out and "bits per byte" in out
    html = page.read_text(encoding="utf-8")
    assert "&lt;" in html and "&amp;" in html and "<b>" not in html
    body = html.split('<div class="text">')[1].split("</div>")[0]
    assert unescape(re.sub(r"<[^>]+>", "", body)) == text  # the spans hold the text exactly, escaped
    assert html.count(" style=\"background:#") >= 10 and 'title="' in html and "http" not in html


def test_surprise_views_join_back_into_the_text(run):
    model, tokenizer, _ = load_run(run)
    text = "Déjà vu — 日本語\nnew line"
    ids = [tokenizer.eot_id] + tokenizer.encode(text)
    assert "".join(token_texts(tokenizer, ids[1:])) == text  # multi-byte characters cut between tokens
    result = token_surprise(model, ids)
    coloured = surprise_terminal(tokenizer, ids, result, color=True)
    assert "48;5;" in coloured and "\x1b[0m" in coloured
    assert surprise_terminal(tokenizer, ids, result, color=False) == text
    page = surprise_html(tokenizer, ids, result, "t")
    assert unescape(re.sub(r"<[^>]+>", "", page.split('<div class="text">')[1].split("</div>")[0])) == text


def test_cli_lens_table_and_picture(run, capsys):
    assert cli_main(["inspect", "lens", str(run), "--text", TEXT]) == 0  # default path: RUN/inspect/lens.png
    out = capsys.readouterr().out
    assert "embeddings" in out and "block 1" in out and "%" in out
    assert (run / "inspect" / "lens.png").stat().st_size > 10_000


def test_cli_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["inspect", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and all(name in out for name in ("attention", "surprise", "lens"))


@pytest.mark.parametrize("argv, message", [
    (["attention", "{missing}", "--text", "x"], "does not exist"),
    (["attention", "{run}", "--text", "x", "--layer", "5", "--head", "0"], "does not exist"),
    (["attention", "{run}", "--layer", "1", "--head", "0"], "give one"),
    (["surprise", "{run}"], "--text or --file"),
    (["lens", "{run}", "--text", "word " * 100], "context window"),
])
def test_cli_user_errors_exit_2(run, tmp_path, capsys, argv, message):
    argv = [a.format(run=run, missing=tmp_path / "nope") for a in argv]
    assert cli_main(["inspect", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
