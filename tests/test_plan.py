"""`minigpt plan`: its arithmetic by hand, its model sizes against GPT itself, its memory model against the memory
a real training step allocates on the CPU, its checkpoint size against a saved checkpoint, and its commands
against train's own parser."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from minigpt.cli import main as cli_main
from minigpt.common import UserError
from minigpt.common import config as configlib
from minigpt.model import estimate as estlib
from minigpt.model.gpt import GPT, PRESETS, ModelConfig
from minigpt.model.optim import make_optimizer
from minigpt.plan import plan as planlib
from minigpt.runs.checkpoint import save_checkpoint
from minigpt.runs.runtime import loss_chunk_rows
from minigpt.train.train import TrainConfig

GPT2_PARAMS = 124_439_808  # GPT-2 124M by GPT-2's count (docs/walkthrough.md)
GPT2_FLOPS = 741_920_256 + 113_246_208  # 6N + 12 L C T at T = 1024 (docs/walkthrough.md)
REPO = Path(__file__).resolve().parent.parent


def make_plan(**settings) -> planlib.Plan:
    return planlib.plan(planlib.PlanConfig(**settings))


def only(p: planlib.Plan) -> planlib.Candidate:
    (candidate,) = p.candidates
    return candidate


# ----------------------------------------------------------------------------------------------------------------
# Sizes and FLOPs: the closed forms against the model


@pytest.mark.parametrize("name", list(PRESETS))
def test_params_and_flops_equal_the_models_own(name):
    cfg = ModelConfig.from_preset(name)
    with torch.device("meta"):  # shapes only: gpt2-xl allocates nothing
        model = GPT(cfg)
    for seq in (cfg.block_size, 128):
        assert estlib.flops_per_token(cfg, seq) == model.flops_per_token(seq)
    assert estlib.num_params(cfg) == model.num_params()
    assert estlib.stored_params(cfg) == sum(p.numel() for p in model.parameters())


def test_params_without_biases_and_with_vocabulary_padding():
    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=64, block_size=32, vocab_size=1000, bias=False)  # pads to 1024
    with torch.device("meta"):
        model = GPT(cfg)
    assert estlib.stored_params(cfg) == sum(p.numel() for p in model.parameters())
    assert estlib.num_params(cfg) == model.num_params()
    assert estlib.flops_per_token(cfg, 32) == model.flops_per_token(32)


# ----------------------------------------------------------------------------------------------------------------
# Memory: the model against what a training step allocates


def measured_peak_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int, grad_accum: int, precision: str,
                        chunk_rows: int, trace: Path) -> int:
    """Peak bytes of live tensors while a model is built and trained for two steps the way train.py does it.

    torch.profiler(profile_memory=True) records every allocation and free through PyTorch's CPU allocator, each
    with the allocator's running total; everything is allocated inside the profile, so the largest running total
    (less the total before its first allocation) is the peak of weights, optimizer state, gradients, activations
    and temporaries together: the CPU's torch.cuda.max_memory_allocated().
    """
    torch.manual_seed(0)
    shape = (micro_batch, seq_len)
    batches = [(torch.randint(0, cfg.vocab_size, shape), torch.randint(0, cfg.vocab_size, shape))
               for _ in range(grad_accum)]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu",
                                                                                                    enabled=False)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = GPT(cfg).train()
        optimizer = make_optimizer(model, TrainConfig(), torch.device("cpu"))
        for _step in range(2):  # the second step is the steady one: AdamW's moments exist
            for x, y in batches:
                with autocast:
                    loss_sum = model(x, y, reduction="sum", chunk_rows=chunk_rows)[1]  # the logits not kept, as there
                (loss_sum / (y.numel() * grad_accum)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    prof.export_chrome_trace(str(trace))
    events = [e["args"] for e in json.loads(trace.read_text())["traceEvents"]
              if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]  # 0: the CPU
    before = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - before


GPT2_WIDE_2_LAYERS = dict(n_layer=2, n_head=12, n_embd=768, block_size=128, vocab_size=50257)  # GPT-2's widths
MEMORY_CASES = [  # shape, micro-batch, sequence, accumulation, precision, loss, checkpointing
    ("tiny", 8, 256, 1, "fp32", "chunked", False),  # train.py on a CPU: fp32, the chunked loss
    ("tiny", 8, 256, 1, "fp32", "chunked", True),
    ("mini", 2, 256, 1, "fp32", "chunked", False),
    ("mini", 2, 256, 1, "fp32", "chunked", True),
    ("mini", 2, 256, 2, "fp32", "chunked", False),  # accumulation: gradients exist from the second micro-batch on
    ("mini", 2, 256, 1, "bf16", "plain", False),  # train.py's GPU path: autocast, the plain head and cross-entropy
    ("mini", 2, 256, 1, "bf16", "plain", True),
    ("gpt2-wide", 2, 128, 1, "fp32", "plain", False),  # a padded vocabulary; the peak at the tied embedding
]
if os.environ.get("MINIGPT_PLAN_SWEEP"):  # every combination, 48 (25 minutes on 2 busy cores; docs/plan.md)
    MEMORY_CASES = [(shape, micro, seq, accum, precision, loss, checkpointing)
                    for shape, micro, seq in (("tiny", 8, 256), ("mini", 2, 256), ("gpt2-wide", 2, 128))
                    for accum in (1, 2) for precision in ("fp32", "bf16") for loss in ("chunked", "plain")
                    for checkpointing in (False, True)]


@pytest.mark.parametrize("shape,micro_batch,seq_len,grad_accum,precision,loss,checkpointing", MEMORY_CASES)
def test_memory_model_within_15_percent_of_measured_peak(shape, micro_batch, seq_len, grad_accum, precision, loss,
                                                         checkpointing, tmp_path):
    settings = GPT2_WIDE_2_LAYERS if shape == "gpt2-wide" else PRESETS[shape]
    cfg = ModelConfig(**settings, gradient_checkpointing=checkpointing)
    chunk = loss_chunk_rows("on" if loss == "chunked" else "off", torch.device("cpu"), cfg.padded_vocab_size)
    measured = measured_peak_bytes(cfg, micro_batch, seq_len, grad_accum, precision, chunk, tmp_path / "trace.json")
    estimated = estlib.training_memory(cfg, micro_batch=micro_batch, seq_len=seq_len, precision=precision,
                                        checkpointing=checkpointing, grad_accum=grad_accum, loss_chunk_rows=chunk)
    print(f"\n{shape} {micro_batch}x{seq_len} accum {grad_accum} {precision} {loss} checkpointing {checkpointing}: "
          f"measured {measured / 2**20:.2f} MiB, model {estimated.total / 2**20:.2f} MiB "
          f"({100 * (estimated.total / measured - 1):+.1f}%), {estimated.phase}")  # for docs/plan.md (pytest -s)
    assert estimated.total == pytest.approx(measured, rel=0.15)
    # and the part that depends on the batch, the model's real subject, on its own
    state = estimated.weights + estimated.optimizer
    assert estimated.total - state == pytest.approx(measured - state, rel=0.15)


def test_checkpointing_and_smaller_micro_batches_need_less():
    cfg = ModelConfig.from_preset("gpt2")
    kw = dict(seq_len=1024, precision="bf16", grad_accum=16)
    plain = estlib.training_memory(cfg, micro_batch=32, checkpointing=False, **kw)
    assert estlib.training_memory(cfg, micro_batch=32, checkpointing=True, **kw).total < plain.total
    assert estlib.training_memory(cfg, micro_batch=16, checkpointing=False, **kw).total < plain.total
    # the fixed part alone is 16 bytes per stored parameter: weights, gradients, AdamW's two moments
    assert plain.weights + plain.gradients + plain.optimizer == 16 * estlib.stored_params(cfg)


def test_checkpointing_only_where_nothing_fits_without_it():
    xl = ModelConfig.from_preset("gpt2-xl")
    p = make_plan(gpu="V100-32GB", tokens=1e9, model=xl)  # 16 bytes x 1.56B parameters leave little room
    c = only(p)
    assert c.micro_batch_plain is None and c.micro_batch_checkpointing is not None
    assert c.run.checkpointing and c.run.memory.total <= estlib.GPUS["V100-32GB"].usable_bytes
    assert p.commands[-1].endswith("--model.gradient-checkpointing")
    medium = only(make_plan(gpu="V100-32GB", tokens=1e9, model=ModelConfig.from_preset("gpt2-medium")))
    assert medium.micro_batch_plain is not None and not medium.run.checkpointing
    forced = ModelConfig.from_preset("gpt2-medium", gradient_checkpointing=True)  # the model's own flag asks for it
    assert only(make_plan(gpu="V100-32GB", tokens=1e9, model=forced)).run.checkpointing
    nothing = make_plan(gpu="T4", tokens=1e9, model=xl)  # not even the weights and AdamW fit in 16 GB
    assert nothing.recommended is None and nothing.commands == [] and only(nothing).run is None


def test_largest_micro_batch_is_the_largest_divisor_that_fits():
    cfg = ModelConfig.from_preset("gpt2")
    card = dataclasses.replace(estlib.GPUS["A100-40GB"], memory_bytes=12 * 2**30)
    kw = dict(seq_len=1024, precision="bf16", checkpointing=False)
    micro = estlib.largest_micro_batch(cfg, tokens_per_step=2**19, world=2, gpu=card, **kw)
    assert micro is not None and 256 % micro == 0  # 2^19 / (1024 x 2 GPUs) = 256 sequences per GPU
    assert estlib.training_memory(cfg, micro_batch=micro, grad_accum=256 // micro, **kw).total <= card.usable_bytes
    assert estlib.training_memory(cfg, micro_batch=2 * micro, grad_accum=128 // micro, **kw).total > card.usable_bytes
    tiny_card = dataclasses.replace(card, memory_bytes=2 * 2**30)  # not even the weights and AdamW fit
    assert estlib.largest_micro_batch(cfg, tokens_per_step=2**19, world=1, gpu=tiny_card, **kw) is None


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints on disk


@pytest.mark.parametrize("optimizer_name", ["adamw", "muon"])
def test_checkpoint_size_matches_a_saved_checkpoint(tmp_path, optimizer_name):
    cfg = ModelConfig.from_preset("tiny")
    model = GPT(cfg).train()
    optimizer = make_optimizer(model, TrainConfig(optimizer=optimizer_name), torch.device("cpu"))
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    model(x, x)[1].backward()
    optimizer.step()  # AdamW's moments exist from the first step on
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "data": {"step": 1},
             "rng_cpu": torch.get_rng_state(), "step": 1, "best_val": 5.0}  # what train.py saves
    ckpt = save_checkpoint(tmp_path, model, 1, {"val_loss": 5.0}, state)
    on_disk = sum(f.stat().st_size for f in ckpt.iterdir())
    run = estlib.estimate_run(cfg, seq_len=256, micro_batch=1, grad_accum=1, world=1, steps=1, precision="fp32",
                               gpu=None, mfu=None, checkpointing=False, keep_checkpoints=2,
                               optimizer=optimizer_name)
    assert run.checkpoint_bytes == pytest.approx(on_disk, rel=0.01)
    held = sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values() if v.dim())
    assert held == estlib.optimizer_bytes(cfg, optimizer_name)  # Muon: one buffer per matrix entry, not two
    assert run.checkpoint_disk_bytes == 4 * run.checkpoint_bytes  # 2 kept + the best + the one being written
    assert run.fits is None and run.tokens_per_s is None and run.hours is None  # no GPU, no speed


# ----------------------------------------------------------------------------------------------------------------
# The plan's arithmetic, by hand


def test_dollars_on_an_a100_by_hand():
    p = make_plan(gpu="A100-40GB", usd=15, usd_per_hour=1.29, mfu=0.3, model=ModelConfig.from_preset("gpt2"))
    c = only(p)
    train_seconds = 15 / 1.29 * 3600 * 0.95  # 5% of the budget kept for compilation, evaluation, checkpoints
    tokens_per_s = 0.3 * 312e12 / GPT2_FLOPS  # 109,453
    steps = int(train_seconds * tokens_per_s // 524_288)
    assert c.run.flops_per_token == GPT2_FLOPS and c.run.params == GPT2_PARAMS
    assert c.run.tokens_per_s == pytest.approx(tokens_per_s)
    assert c.run.steps == steps == 8_302
    assert c.run.total_tokens == steps * 524_288
    assert c.tokens_per_param == pytest.approx(steps * 524_288 / GPT2_PARAMS)  # 34.9
    assert c.epochs == pytest.approx(steps * 524_288 / 10e9)
    assert c.usd == pytest.approx(15.0) and c.hours == pytest.approx(15 / 1.29)


def test_eight_h100s_for_two_hours_by_hand():
    medium = ModelConfig.from_preset("gpt2-medium")
    p = make_plan(gpu="H100-SXM", gpus=8, hours=2, usd_per_hour=3.0, mfu=0.4, model=medium)
    c = only(p)
    params = 354_823_168  # GPT-2 350M by GPT-2's count
    fpt = 6 * (params - 1024 * 1024) + 12 * 24 * 1024 * 1024
    tokens_per_s = 8 * 0.4 * 989e12 / fpt  # eight GPUs, data parallel
    steps = int(2 * 3600 * 0.95 * tokens_per_s // 524_288)
    assert c.run.params == params and c.run.flops_per_token == fpt
    assert c.run.steps == steps and c.run.total_tokens == steps * 524_288
    assert c.run.micro_batch * c.run.grad_accum * 8 * 1024 == 524_288
    assert c.usd == pytest.approx(2 * 8 * 3.0)  # hours x GPUs x price per GPU-hour


def test_a_token_budget_on_a_t4_by_hand():
    p = make_plan(gpu="T4", tokens=1e9, mfu=0.25, model=ModelConfig.from_preset("gpt2"))
    c = only(p)
    steps = math.ceil(1e9 / 524_288)  # 1,908 whole steps
    tokens_per_s = 0.25 * 65e12 / GPT2_FLOPS
    assert c.run.steps == steps == 1_908 and c.run.total_tokens == 1_000_341_504
    assert c.hours == pytest.approx(1_000_341_504 / tokens_per_s / 3600 / 0.95)
    assert c.usd is None  # no price given
    assert c.tokens_per_param == pytest.approx(1_000_341_504 / GPT2_PARAMS)


def test_checkpointing_costs_its_recomputation_in_time():
    cfg = ModelConfig.from_preset("gpt2")
    kw = dict(seq_len=1024, micro_batch=16, grad_accum=32, world=1, steps=1000, precision="bf16",
              gpu=estlib.GPUS["H100-SXM"], mfu=0.4, keep_checkpoints=2)
    plain = estlib.estimate_run(cfg, checkpointing=False, **kw)
    ckpt = estlib.estimate_run(cfg, checkpointing=True, **kw)
    recompute = 2 * 12 * 768**2 * 12 + 4 * 12 * 768 * 1024  # one more forward pass of the blocks
    assert ckpt.hours / plain.hours == pytest.approx((GPT2_FLOPS + recompute) / GPT2_FLOPS)


# ----------------------------------------------------------------------------------------------------------------
# Precision, GPUs, the scaling law


@pytest.mark.parametrize("gpu,precision", [("V100-16GB", "fp16"), ("V100-32GB", "fp16"), ("T4", "fp16"),
                                           ("A100-40GB", "bf16"), ("L4", "bf16"), ("H100-SXM", "bf16")])
def test_pre_ampere_cards_train_in_fp16(gpu, precision):
    p = make_plan(gpu=gpu, tokens=1e9, model=ModelConfig.from_preset("gpt2"))
    assert only(p).run.precision == precision
    assert ("--precision fp16" in p.commands[-1]) == (precision == "fp16")  # the recipe's own is bf16


def test_precision_rule_and_bf16_refused_below_ampere():
    assert estlib.precision_for_capability((7, 0)) == estlib.precision_for_capability((7, 5)) == "fp16"
    assert estlib.precision_for_capability((8, 0)) == estlib.precision_for_capability((9, 0)) == "bf16"
    with pytest.raises(UserError, match="no native bf16"):
        make_plan(gpu="T4", tokens=1e9, precision="bf16")


@pytest.mark.parametrize("device_name,key", [
    ("NVIDIA A100-SXM4-40GB", "A100-40GB"), ("NVIDIA A100-PCIE-40GB", "A100-40GB"),
    ("NVIDIA A100-SXM4-80GB", "A100-80GB"), ("NVIDIA A100 80GB PCIe", "A100-80GB"),
    ("NVIDIA H100 80GB HBM3", "H100-SXM"), ("NVIDIA H100 PCIe", "H100-PCIe"), ("NVIDIA H200", "H200"),
    ("NVIDIA L4", "L4"), ("NVIDIA A10G", "A10G"), ("NVIDIA GeForce RTX 4090", "RTX-4090"),
    ("NVIDIA GeForce RTX 3090", "RTX-3090"), ("Tesla T4", "T4"), ("Tesla V100-SXM2-16GB", "V100-16GB"),
    ("Tesla V100-PCIE-32GB", "V100-32GB"), ("NVIDIA L40S", "L40S"), ("NVIDIA H100 NVL", "H100-NVL"),
    ("NVIDIA GH200 480GB", "GH200-96GB"), ("NVIDIA A100-SXM4-64GB", None), ("NVIDIA A10", None),
    ("AMD Instinct MI300X", None),
])
def test_gpu_for_device_names(device_name, key):
    spec = estlib.gpu_for_device(device_name)
    assert (spec.key if spec else None) == key


def test_compute_optimal_size_follows_the_law():
    p = make_plan(gpu="A100-40GB", usd=15, usd_per_hour=1.29)
    flops = 15 / 1.29 * 3600 * 0.95 * 312e12 * estlib.ASSUMED_MFU
    assert p.compute_flops == pytest.approx(flops)
    n = p.optimal_params
    assert n == pytest.approx(math.sqrt(flops / 120)) and 6 * n * (20 * n) == pytest.approx(flops)
    proposed = next(c for c in p.candidates if c.name not in PRESETS)
    depth = proposed.model.n_layer
    assert (proposed.model.n_head, proposed.model.n_embd) == (depth, 64 * depth)
    error = abs(math.log(estlib.num_params(proposed.model) / n))
    for other in (depth - 1, depth + 1):  # the neighbours of the family are further from N
        assert abs(math.log(estlib.num_params(estlib.depth_shape(other, 1024, 50257)) / n)) > error
    assert [c.name for c in p.candidates[:4]] == ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]


def test_a_budget_whose_optimum_is_gpt2_does_not_repeat_it():
    flops = 120 * GPT2_PARAMS**2  # C = 6 N (20 N) at N = 124M
    hours = flops / (312e12 * 0.315 * 0.95 * 3600)
    p = make_plan(gpu="A100-40GB", hours=hours)
    assert [c.name for c in p.candidates] == ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]
    assert estlib.depth_shape(12, 1024, 50257) == ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024,
                                                               vocab_size=50257)


def test_expected_loss_is_anchored_and_falls_with_size_and_tokens():
    anchor = estlib.ANCHOR
    assert estlib.expected_loss(anchor["params"], anchor["tokens"]) == pytest.approx(3.2847)
    c = estlib.CHINCHILLA
    shift = 3.2847 - (c["E"] + c["A"] / anchor["params"] ** c["alpha"] + c["B"] / anchor["tokens"] ** c["beta"])
    assert estlib.expected_loss(350e6, 30e9) == pytest.approx(
        1.69 + 406.4 / 350e6**0.34 + 410.7 / 30e9**0.28 + shift)
    assert estlib.expected_loss(350e6, 10e9) < estlib.expected_loss(124e6, 10e9)
    assert estlib.expected_loss(124e6, 20e9) < estlib.expected_loss(124e6, 10e9)


# ----------------------------------------------------------------------------------------------------------------
# Commands and the command line


def test_train_command_parses_to_the_planned_run():
    p = make_plan(gpu="V100-16GB", hours=6, model=ModelConfig.from_preset("gpt2-medium"), checkpointing="on")
    run, command = only(p).run, p.commands[-1]
    assert p.commands[0] == ("minigpt prepare --sources hf:HuggingFaceFW/fineweb-edu:sample-10BT --tokenizer gpt2 "
                             "--out data/fineweb-edu-10B")
    assert command.startswith("minigpt train --config gpt2-124m ")
    import argparse

    from minigpt.cli import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    cfg = configlib.config_from_args(TrainConfig, parser.parse_args(command.split()[2:]))
    assert (cfg.max_steps, cfg.batch_size, cfg.batch_tokens, cfg.precision) == (run.steps, run.micro_batch,
                                                                               run.tokens_per_step, "fp16")
    assert cfg.model.preset == "gpt2-medium" and cfg.model.n_layer == 24 and cfg.model.gradient_checkpointing
    assert cfg.lr == 3e-4 and cfg.run_dir == "runs/gpt2-medium"  # GPT-3's rate for 350M


def test_cli_on_a_cpu_prints_table_commands_and_json():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    args = [sys.executable, "-m", "minigpt", "plan", "--gpu", "A100-40GB", "--usd", "15", "--usd-per-hour", "1.29"]
    out = subprocess.run(args, capture_output=True, text=True, env=env, check=True).stdout
    for line in ("peak memory per GPU", "expected val loss (estimate)", "recommended: gpt2",
                 "minigpt train --config gpt2-124m --max-steps"):
        assert line in out
    data = json.loads(subprocess.run(args + ["--json"], capture_output=True, text=True, env=env, check=True).stdout)
    assert data["recommended"] == "gpt2" and data["commands"][-1] in out
    assert data["candidates"][0]["run"]["memory"]["total"] > 0


@pytest.mark.parametrize("marker, optimizer", [("plan-example", "adamw"), ("plan-muon-example", "muon")])
def test_worked_example_in_the_docs_is_the_current_output(marker, optimizer):
    text = (REPO / "docs" / "plan.md").read_text()
    start = text.index(f"<!-- {marker} -->\n```\n") + len(f"<!-- {marker} -->\n```\n")
    shown = text[start:text.index("```", start)]
    cfg = planlib.PlanConfig(gpu="A100-40GB", usd=15, usd_per_hour=1.29, optimizer=optimizer)
    assert shown.strip() == planlib.format_plan(planlib.plan(cfg), cfg).strip()


@pytest.mark.parametrize("args,message", [
    ([], "give one budget"),
    (["--usd", "15"], "--usd-per-hour"),
    (["--gpu", "X100", "--hours", "1"], "unknown GPU"),
    (["--gpu", "T4", "--hours", "1", "--precision", "bf16"], "no native bf16"),
    (["--hours", "1", "--model.preset", "gpt2", "--seq-len", "2048"], "context window"),
])
def test_user_errors_are_one_line(args, message, capsys):
    assert cli_main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------------------------
# Muon: Newton-Schulz's FLOPs, the token-efficiency factor, both losses


def test_newton_schulz_flops_are_those_torch_counts():
    from torch.utils.flop_counter import FlopCounterMode

    from minigpt.model.optim import orthogonalise

    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=48, block_size=16, vocab_size=64)
    model = GPT(cfg)
    matrices = [p for n, p in model.named_parameters() if n.startswith("h.") and n.endswith("weight") and p.dim() == 2]
    with FlopCounterMode(display=False) as counter:
        for p in matrices:
            orthogonalise(p.detach(), 5)
    assert counter.get_total_flops() == estlib.newton_schulz_flops(cfg, 5) == 5 * 2 * 56 * 48**3


def test_muon_plan_prints_both_losses_the_smallest_factor_and_its_sources():
    cfg = planlib.PlanConfig(gpu="A100-40GB", usd=15, usd_per_hour=1.29, optimizer="muon")
    p = planlib.plan(cfg)
    text = planlib.format_plan(p, cfg)
    factor, source = estlib.token_efficiency()
    assert factor == min(estlib.TOKEN_EFFICIENCY.values()) <= estlib.MEASURED_TOKEN_EFFICIENCY
    gpt2 = next(c for c in p.candidates if c.name == "gpt2").run
    assert gpt2.expected_loss == pytest.approx(estlib.expected_loss(gpt2.params, gpt2.total_tokens * factor))
    assert gpt2.adamw_expected_loss == pytest.approx(estlib.expected_loss(gpt2.params, gpt2.total_tokens))
    assert f"{gpt2.adamw_expected_loss:.2f}" == "3.44" and gpt2.expected_loss < 3.40
    assert "expected val loss, AdamW (estimate)" in text and "expected val loss, Muon (estimate)" in text
    assert all(name.split(":")[0] in text.replace("\n    ", " ") for name in estlib.TOKEN_EFFICIENCY)
    assert f"tokens x {factor:g}" in text and "(taken)" in text
    assert p.commands[-1].startswith("minigpt train --config gpt2-124m-muon ")
    # the same money buys a few steps fewer (Newton-Schulz) and the state is lighter
    adamw = next(c for c in make_plan(gpu="A100-40GB", usd=15, usd_per_hour=1.29).candidates if c.name == "gpt2").run
    assert 0.99 * adamw.steps < gpt2.steps < adamw.steps
    assert gpt2.memory.optimizer < adamw.memory.optimizer and gpt2.checkpoint_bytes < adamw.checkpoint_bytes
