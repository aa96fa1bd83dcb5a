"""The GPU path's loose ends (issue 28), each shown on the CPU: the logged tokens/s, FlexAttention for packed rows,
no host synchronisation in a cached decoding step, padded fine-tuning batches of few widths, the A100 recipe and
the dry run that answers for the GPU a recipe targets."""

from __future__ import annotations

import json
import shutil
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from minigpt.chat.engine import Engine, SamplingParams
from minigpt.model import estimate as estlib
from minigpt.model import gpt as modellib
from minigpt.model.gpt import GPT, ModelConfig
from minigpt.runs.log import read_metrics
from minigpt.train import train as trainlib
from minigpt.train.train import TrainConfig

# ----------------------------------------------------------------------------------------------------------------
# tokens/s: the window's tokens over the window's training time, evaluations and checkpoints left out


class Clock:
    """time.perf_counter for train.py: 1 s per training step, 100 s per evaluation and save."""

    def __init__(self) -> None:
        self.now = 0.0

    def module(self) -> types.SimpleNamespace:
        return types.SimpleNamespace(perf_counter=lambda: self.now, monotonic=time.monotonic)


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(trainlib, "time", clock.module())
    real_step, real_save, real_evaluate = trainlib.train_step, trainlib.Trainer.save, trainlib.Trainer.evaluate

    def step(*args, **kwargs):
        clock.now += 1.0
        return real_step(*args, **kwargs)

    def slow(real):
        def wrapped(*args, **kwargs):
            clock.now += 100.0
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(trainlib, "train_step", step)
    monkeypatch.setattr(trainlib.Trainer, "save", slow(real_save))
    monkeypatch.setattr(trainlib.Trainer, "evaluate", slow(real_evaluate))
    return clock


def test_tokens_per_second_counts_training_time_only(tmp_path, tiny_shards, clock):
    """Log every 3 steps, evaluate every 4, save every 5: every window's rate is one step's tokens per second. (Before
    the fix a window a checkpoint or evaluation fell into counted all its tokens over the time after it: 3x.)"""
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), data=str(tiny_shards), device="cpu", sample_prompt="",
                      model=ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32), batch_size=8, max_steps=9,
                      log_every=3, eval_every=4, eval_batches=1, checkpoint_every=5, checkpoint_minutes=0,
                      warmup_steps=1)
    trainlib.train(cfg)
    rates = [r["tokens_per_s"] for r in read_metrics(Path(cfg.run_dir)) if "tokens_per_s" in r]
    assert rates == [8 * 32] * 3
    # resumed from step 5 (the checkpoint of step 9 lost): the window its checkpoint carries (steps 4 and 5) was
    # timed by the process that ended, and the new one's rate counts its own steps only
    shutil.rmtree(Path(cfg.run_dir) / "checkpoints" / "step_00000009")
    cfg.resume = True
    trainlib.train(cfg)
    resumed = [r for r in read_metrics(Path(cfg.run_dir)) if "tokens_per_s" in r and r["step"] > 5]
    assert [r["step"] for r in resumed] == [6, 9] and [r["tokens_per_s"] for r in resumed] == [8 * 32] * 2


# ----------------------------------------------------------------------------------------------------------------
# Packed rows through FlexAttention: equal to the dense-mask path, forward and backward


def packed_batch(B: int = 3, T: int = 64, vocab: int = 100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (B, T), generator=g)
    doc_ids = torch.cumsum(torch.rand(B, T, generator=g) < 0.08, dim=1)  # documents of ~12 tokens, row by row
    y = torch.where(torch.rand(B, T, generator=g) < 0.2, -100, torch.randint(0, vocab, (B, T), generator=g))
    return x, y, doc_ids


@pytest.mark.parametrize("checkpointing", [False, True])
def test_flex_attention_equals_the_dense_mask_forward_and_backward(monkeypatch, checkpointing):
    """The GPU's path (FlexAttention with a BlockMask made from the document ids) against the CPU's reference (a
    dense block-diagonal causal mask), on the CPU. torch 2.13 refuses a FlexAttention backward pass on CPUs
    outright; its eager backward, allowed here, computes the same math as the GPU's fused kernel, so this checks
    what this project writes: the mask function, the BlockMask and the model's use of it."""
    import torch.nn.attention.flex_attention as flex_module
    from torch.nn.attention.flex_attention import BlockMask

    x, y, doc_ids = packed_batch()
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=100,
                            gradient_checkpointing=checkpointing)).train()

    def run(flex: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        monkeypatch.setattr(modellib, "FLEX_DEVICES", ("cpu",) if flex else ())
        model.zero_grad(set_to_none=True)
        logits, loss = model(x, y, doc_ids=doc_ids)
        loss.backward()
        return logits, loss, {n: p.grad.clone() for n, p in model.named_parameters()}

    monkeypatch.setattr(flex_module, "_validate_device", lambda *tensors: None)
    dense, flex = run(False), run(True)
    assert isinstance(modellib.document_block_mask(doc_ids), BlockMask)
    torch.testing.assert_close(flex[0], dense[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(flex[1], dense[1], rtol=1e-6, atol=0)
    for name, grad in dense[2].items():
        torch.testing.assert_close(flex[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_block_mask_skips_the_tiles_no_query_may_see():
    """Three documents of 128 tokens per row: of its 3 x 3 tiles of 128 queries x 128 keys, only the diagonal ones
    hold a pair that may attend (causal inside: partial tiles); the six others are skipped, never computed."""
    doc_ids = torch.repeat_interleave(torch.tensor([0, 1, 2]), 128)[None].expand(2, -1)
    mask = modellib.document_block_mask(doc_ids)
    dense = modellib.document_attention(doc_ids)[1]
    tiles = dense.reshape(2, 1, 3, 128, 3, 128).any(-1).any(-2)  # (B, 1, 3, 3): tiles with a pair that may attend
    assert tiles.sum().item() == 2 * 3
    assert mask.kv_num_blocks.sum().item() == 2 * 3 and mask.full_kv_num_blocks.sum().item() == 0
    assert mask.to_dense().bool().equal(tiles)  # (the BlockMask's own tile map)


# ----------------------------------------------------------------------------------------------------------------
# Decoding with the KV cache: no host synchronisation per forward pass


class HostReads(TorchDispatchMode):
    """Counts the reads of a tensor's value by the host (int(), .item(), bool() of a tensor: aten's item and
    _local_scalar_dense), each of which waits for the GPU to finish all queued work on a real device."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func in (torch.ops.aten.item.default, torch.ops.aten._local_scalar_dense.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_a_decoding_step_never_reads_a_tensor_on_the_host():
    """Three int() reads per forward pass before (the longest row, the widest position, whether the rows start
    empty): each a stall of the GPU's queue per token generated. The cache keeps its lengths on the host too."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50)).eval()
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    with torch.inference_mode(), Engine(model, max_batch=4, seed=0, prepack=False) as engine:
        engine.add([engine.new_generation(p, SamplingParams(max_new_tokens=8, temperature=0.0)) for p in prompts])
        tokens = torch.tensor([[s.next_input] for s in engine.live])
        with HostReads() as reads:
            hidden = model.hidden_states(tokens, engine.cache, slice(0, 2))  # one decoding step of both rows
        assert reads.count == 0
        assert engine.cache.host_lengths[:2] == engine.cache.lengths[:2].tolist() == [6, 3]
        # and it decodes what a forward pass over the whole sequences computes
        full = model.hidden_states(torch.tensor([[*prompts[0], engine.live[0].next_input]]))
        torch.testing.assert_close(hidden[0, -1], full[0, -1], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# --no-pack fine-tuning: a few batch widths, for torch.compile


def test_padded_batches_take_a_few_widths_and_the_same_loss(tmp_path, tiny_shards):
    """One conversation per row used to be padded to the longest of its batch: a new width almost every step, a
    new compilation each time. Now widths are powers of two from 64 up to the window, and the padding (targets
    -100 to the right of every real token) leaves the loss as it was."""
    from minigpt.data.sft_batches import ConversationBatches, ConversationSet, Part, assemble
    from minigpt.data.sft_data import PrepareSettings, prepare_source
    from minigpt.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tiny_shards / "tokenizer.json").with_chat_tokens()
    rng = np.random.default_rng(0)
    words = ["the", "of", "and", "in", "a", "is", "was", "to", "for", "as", "on", "by", "with"]
    say = lambda k: " ".join(rng.choice(words, int(k)))  # noqa: E731
    rows = [{"messages": [{"role": "user", "content": say(rng.integers(1, 30))},
                          {"role": "assistant", "content": say(rng.integers(1, 400))}]} for _ in range(120)]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepared = prepare_source(str(path), tokenizer, PrepareSettings(held_out=0.1, workers=1), tmp_path / "cache",
                              quiet=True)
    window = 512
    convs = ConversationSet([Part(prepared.split("train"))], window)
    batches = ConversationBatches(convs, batch_size=4, pad_id=0, seed=1, packed=False)
    widths = {batches.batch(step)[0].shape[1] for step in range(25)}
    assert widths <= {64, 128, 256, 512} and len(widths) >= 2
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=window, vocab_size=tokenizer.n_vocab)).eval()
    x, y, _, _ = assemble(convs, batches.plan(0)[:4], 0, packed=False)
    tight = max(len(convs.conversation(int(row[0]))[0]) for row in batches.plan(0)[:4])
    assert x.shape[1] in (64, 128, 256, 512) and x.shape[1] >= tight
    with torch.no_grad():
        wide = model(torch.from_numpy(x), torch.from_numpy(y), reduction="sum")[1]
        narrow = model(torch.from_numpy(x[:, :tight]), torch.from_numpy(y[:, :tight]), reduction="sum")[1]
    torch.testing.assert_close(wide, narrow, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# The A100 40GB recipe is the plan's run on that card


def test_the_a100_recipe_is_what_the_plan_lays_out_for_that_card():
    """The plan on an A100 40GB: bf16 (the card computes it natively), no gradient checkpointing (30.8 of 35.1 GiB
    fit without; recomputing would cost 24% more compute), 8,717 steps for $15. The recipe was fp16 with
    checkpointing and said 7,383 / 9,175 steps."""
    from minigpt.common import config as configlib
    from minigpt.plan import plan as planlib

    recipe = configlib.load_file("gpt2-124m-a100-40gb")
    cfg = planlib.PlanConfig(gpu=recipe["gpu"], usd=15, usd_per_hour=1.29, model=ModelConfig.from_preset("gpt2"))
    run = planlib.plan(cfg).candidates[0].run
    assert (recipe["precision"], recipe["model"].get("gradient_checkpointing", False)) == (run.precision,
                                                                                         run.checkpointing)
    assert (recipe["batch_size"], recipe["batch_tokens"]) == (run.micro_batch, run.tokens_per_step)
    header = configlib.recipe_path("gpt2-124m-a100-40gb").read_text()
    assert f"$15 buys {run.steps:,} steps" in header and f"--max-steps {run.steps}\n" in header
    with_checkpointing = planlib.plan(planlib.PlanConfig(**{**vars(cfg), "checkpointing": "on"}))
    assert f"would buy {with_checkpointing.candidates[0].run.steps:,} steps" in header
    assert f"need {run.memory.total / 2**30:.1f} GiB of the {estlib.GPUS['A100-40GB'].usable_bytes / 2**30:.1f}" \
        in " ".join(line.lstrip("# ") for line in header.splitlines())
