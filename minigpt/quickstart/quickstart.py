"""`minigpt quickstart`: the whole pipeline on a CPU in minutes, in one folder, resumable.

    minigpt quickstart                         # runs/quickstart/{data,base,chat,report.md}, about 7 minutes on 2 cores
    minigpt quickstart --minutes 30            # the same pipeline sized to 30 minutes on this machine

1. data   a BPE vocabulary (chat tokens included) trained on the bundled Wikipedia summaries, then token shards
          with 2% of the articles held out                                                     -> RUN/data
2. base   pretraining of a small GPT-2 on those shards                                         -> RUN/base
3. chat   supervised fine-tuning on bundled conversations: chatterbot dialogues and questions about the
          Wikipedia articles                                                                   -> RUN/chat
4. report both models on the held-out articles (bits per byte) and on held-out questions (answers decoded as
          `minigpt chat` decodes them): how often an answer ends its turn, names the subject asked about, or
          loops; a handful of real answers                                                      -> RUN/report.md

The default design (vocabulary, shape, batch, optimizer, learning rates, steps, the split of the time between
pretraining and fine-tuning) is the best of measured searches on 2 CPU cores: docs/quickstart.md has every
configuration tried and the commands that reproduce the tables. `--minutes M` measures this machine's speed
with a short probe and scales the design to M minutes (docs/quickstart.md says how).

A second call finds what is done and goes on from there (finished stages are skipped, an interrupted one resumes
from its last checkpoint). Each stage is the same code as its own command: `minigpt train`, `minigpt sft`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Literal

import torch

from minigpt.chat.engine import SamplingParams
from minigpt.common import UserError, print0, read_json, write_json
from minigpt.common import config as configlib
from minigpt.common.config import opt
from minigpt.data.build import build_shards
from minigpt.data.loader import TokenLoader
from minigpt.data.shards import read_meta
from minigpt.eval.evaluate import language_model_metrics
from minigpt.model.gpt import ModelConfig
from minigpt.quickstart.budget import design_for_minutes
from minigpt.runs.loading import latest_checkpoint, load_run, read_checkpoint_meta
from minigpt.text.chat_format import CHAT_DECODING
from minigpt.text.conversations import load_conversations, split_conversations
from minigpt.train.sft import SFTConfig, answer_quality, finetune, grow_vocabulary
from minigpt.train.train import TrainConfig, train


def default_model() -> ModelConfig:
    return ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=8192)


MAX_MINUTES = 1440  # the design was searched at 10 minutes (docs/quickstart.md); a day is far enough to scale it


@dataclasses.dataclass
class QuickstartConfig:
    """Settings of `minigpt quickstart`: where, how long, and the design (defaults: the search's best)."""

    run_dir: str = opt("runs/quickstart", "folder for everything the quickstart makes")
    minutes: float = opt(0.0, "size the pipeline to this many minutes on this machine: a short speed probe picks "
                              "the model and the steps (0: the default design below, about 7 minutes on 2 cores)")
    vocab_size: int = opt(8192, "BPE vocabulary trained on the bundled articles")
    model: ModelConfig = dataclasses.field(default_factory=default_model)
    batch_size: int = opt(8, "pretraining sequences per step")
    optimizer: Literal["adamw", "muon"] = opt("muon", "pretraining optimizer: muon (Muon on the blocks' matrices, "
                                                      "AdamW on the rest) or adamw (docs/quickstart.md)")
    lr: float = opt(4e-3, "pretraining peak learning rate (AdamW's: with muon, of the embeddings, biases and norms)")
    muon_lr: float = opt(8e-3, "pretraining peak learning rate of Muon's matrices")
    schedule: Literal["cosine", "wsd"] = opt("wsd", "pretraining schedule after the warm-up: wsd (hold the peak, "
                                                    "then decay over the last 3/10 of the steps) or cosine")
    pretrain_steps: int = opt(1000, "pretraining steps")
    sft_datasets: list[str] = opt(["chatterbot", "wiki-qa-short"], "conversations to fine-tune on (minigpt sft --list)")
    sft_batch_size: int = opt(4, "fine-tuning rows per step (packed with conversations)")
    sft_lr: float = opt(6e-3, "fine-tuning peak learning rate")
    sft_steps: int = opt(550, "fine-tuning steps")
    questions: int = opt(100, "held-out questions for the report")
    device: str = opt("auto", "auto, cpu, cuda, mps")
    seed: int = opt(1337, "seed for everything")

    def __post_init__(self) -> None:
        if self.minutes < 0 or not math.isfinite(self.minutes):
            raise ValueError("minutes must be 0 (the default design) or a positive number")
        if self.minutes > MAX_MINUTES:
            raise ValueError(f"--minutes is at most {MAX_MINUTES} (a day): the quickstart's probe and design are made "
                             "for minutes to hours on a CPU; for longer runs use minigpt plan, then minigpt train")
        for name in ("vocab_size", "batch_size", "pretrain_steps", "sft_batch_size", "sft_steps", "questions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


def _finished(run: Path, steps: int) -> bool:
    ckpt = latest_checkpoint(run)
    return ckpt is not None and read_checkpoint_meta(ckpt)["step"] >= steps


# ----------------------------------------------------------------------------------------------------------------
# The stages, each usable alone (bench/quickstart_search.py runs them one by one)


def pretraining_config(cfg: QuickstartConfig, data: Path, run: Path):
    model = dataclasses.replace(cfg.model, vocab_size=cfg.vocab_size)
    return TrainConfig(run_dir=str(run), data=str(data), corpus=["wiki"], vocab_size=cfg.vocab_size, model=model,
                       batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr, muon_lr=cfg.muon_lr,
                       schedule=cfg.schedule, max_steps=cfg.pretrain_steps,
                       warmup_steps=max(min(50, cfg.pretrain_steps // 10), 1),
                       eval_every=max(cfg.pretrain_steps // 5, 1), checkpoint_every=max(cfg.pretrain_steps // 5, 1),
                       device=cfg.device, seed=cfg.seed, resume=True)


def build_pretraining_data(cfg: QuickstartConfig, data: Path) -> None:
    """The tokenizer and shards of the bundled articles, once (a data folder of another vocabulary is refused)."""
    if (data / "meta.json").exists():
        built = read_meta(data)["tokenizer"]["n_vocab"]
        if built != cfg.vocab_size:
            raise UserError(f"{data} holds shards of a {built:,}-token vocabulary, not {cfg.vocab_size:,}: use "
                            "another --run-dir for another design")
        return
    build_shards(data, ["wiki"], cfg.vocab_size)


def pretrain(cfg: QuickstartConfig, data: Path, run: Path) -> None:
    if _finished(run, cfg.pretrain_steps):
        print0(f"pretraining already done ({cfg.pretrain_steps} steps): skipped")
        return
    build_pretraining_data(cfg, data)
    train(pretraining_config(cfg, data, run))


def finetune_chat(cfg: QuickstartConfig, base: Path, run: Path) -> None:
    if _finished(run, cfg.sft_steps):
        print0(f"fine-tuning already done ({cfg.sft_steps} steps): skipped")
        return
    finetune(SFTConfig(base=str(base), run_dir=str(run), datasets=list(cfg.sft_datasets),
                       sft_cache=str(run.parent / "sft-data"), batch_size=cfg.sft_batch_size, lr=cfg.sft_lr,
                       max_steps=cfg.sft_steps, warmup_steps=max(min(20, cfg.sft_steps // 10), 1),
                       eval_every=max(cfg.sft_steps // 3, 1), checkpoint_every=max(cfg.sft_steps // 3, 1),
                       device=cfg.device, seed=cfg.seed, resume=True))


def quickstart(cfg: QuickstartConfig) -> Path:
    root = Path(cfg.run_dir)
    if cfg.minutes:
        cfg = sized_for(cfg, root)
    data, base, chat = root / "data", root / "base", root / "chat"
    start = clock = time.perf_counter()
    stage_seconds = {}

    def lap(stage: str) -> None:
        nonlocal clock
        stage_seconds[stage], clock = round(time.perf_counter() - clock, 1), time.perf_counter()

    print0(f"== 1. tokenizer and shards -> {data}")
    build_pretraining_data(cfg, data)  # once (a no-op when built); the report reads the held-out split too
    lap("data")
    print0(f"== 2. pretraining -> {base}")
    pretrain(cfg, data, base)
    lap("pretraining")
    print0(f"== 3. fine-tuning into a chatbot -> {chat}")
    finetune_chat(cfg, base, chat)
    lap("fine-tuning")
    print0("== 4. the report: held-out articles and questions")
    report = compare_on_held_out(base, chat, data, cfg.questions, cfg.seed)
    lap("report")
    report["design"] = configlib.to_dict(cfg)
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["stage_seconds"] = stage_seconds  # this run's: a resumed run counts only what it did
    write_json(root / "report.json", report)
    (root / "report.md").write_text(report_markdown(report))
    print0(report_markdown(report, examples=6))
    print0(f"Talk to it:  minigpt chat {chat}\nEverything is in {root}/")
    return root


# ----------------------------------------------------------------------------------------------------------------
# A time budget: the design scaled to what this machine does in M minutes


def sized_for(cfg: QuickstartConfig, root: Path) -> QuickstartConfig:
    """`cfg` with its model and steps chosen for `cfg.minutes` on this machine (kept in RUN/design.json, so a
    resumed run keeps the design it started with)."""
    saved = root / "design.json"
    if saved.exists():
        return configlib.from_dict(QuickstartConfig, read_json(saved))

    sized = design_for_minutes(cfg)
    root.mkdir(parents=True, exist_ok=True)
    write_json(saved, configlib.to_dict(sized))
    return sized


# ----------------------------------------------------------------------------------------------------------------
# The report


def chat_sampling():
    """How `minigpt chat` decodes (chat.CHAT_DECODING), as engine sampling parameters."""
    return SamplingParams(**CHAT_DECODING)


@torch.no_grad()
def held_out_bits_per_byte(model, data: Path, batch_size: int = 16) -> float:
    """Bits per byte on the held-out articles (the validation split): comparable across vocabularies."""
    loader = TokenLoader(data, "val", batch_size, model.config.block_size, shuffle=False)
    return language_model_metrics(model, loader)["bpb"]


@torch.no_grad()
def compare_on_held_out(base: Path, chat: Path, data: Path, n_questions: int, seed: int) -> dict[str, Any]:
    """Both models on the held-out articles (bits per byte) and on held-out questions, prompted the same way (the
    chat format) and decoded as `minigpt chat` decodes; the chatbot also greedily, and on held-out small talk."""
    _, held = split_conversations(load_conversations(["wiki-qa"]), 0.05, seed)
    held = held[:n_questions]
    chat_model, tokenizer, chat_meta = load_run(chat)
    base_model, _, base_meta = load_run(base)
    base_bpb, chat_bpb = held_out_bits_per_byte(base_model, data), held_out_bits_per_byte(chat_model, data)
    if base_model.config.vocab_size != tokenizer.n_vocab:  # GPT-2's vocabulary: the base lacks the chat tokens
        base_model = grow_vocabulary(base_model, tokenizer.n_vocab).eval()
    sampling = chat_sampling()
    chat_q = answer_quality(chat_model, tokenizer, held, params=sampling)
    base_q = answer_quality(base_model, tokenizer, held, params=sampling)
    greedy_q = answer_quality(chat_model, tokenizer, held)
    _, small_held = split_conversations(load_conversations(["chatterbot"]), 0.05, seed)
    talk = answer_quality(chat_model, tokenizer, small_held[:20], params=sampling)
    rates = lambda q: {k: v for k, v in q.items() if k != "answers"}  # noqa: E731
    return {"questions": len(held), "decoding": dataclasses.asdict(sampling),
            "base": {**rates(base_q), "bits_per_byte": base_bpb, "val_loss": base_meta.get("val_loss")},
            "chat": {**rates(chat_q), "bits_per_byte": chat_bpb, "val_loss": chat_meta.get("val_loss")},
            "chat_greedy": rates(greedy_q), "chat_small_talk": rates(talk),
            "examples": [{"question": c["question"], "chat": c["answer"], "base": b["answer"]}
                         for c, b in zip(chat_q["answers"], base_q["answers"], strict=True)],
            "small_talk_examples": talk["answers"]}


def report_markdown(report: dict[str, Any], examples: int = 10) -> str:
    b, c, g, talk = report["base"], report["chat"], report["chat_greedy"], report["chat_small_talk"]
    d = report["decoding"]
    decoding = (f"temperature {d['temperature']}, top-p {d['top_p']}, frequency penalty {d['frequency_penalty']}, "
                f"presence penalty {d['presence_penalty']}")
    pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    lines = [f"Held-out articles: bits per byte, base {b['bits_per_byte']:.3f}, chat {c['bits_per_byte']:.3f} "
             "(lower is better; comparable across vocabularies).", "",
             f"{report['questions']} held-out questions about Wikipedia articles, same chat-format prompt, decoded as "
             f"`minigpt chat` does ({decoding}):", "",
             "| model | ends its turn | names the subject | repeats itself |", "|---|---:|---:|---:|",
             f"| base (pretrained only) | {pct(b['ended_rate'])} | {pct(b['subject_rate'])} | "
             f"{pct(b['repetition_rate'])} |",
             f"| chat (fine-tuned) | {pct(c['ended_rate'])} | {pct(c['subject_rate'])} | "
             f"{pct(c['repetition_rate'])} |",
             f"| chat, greedy decoding | {pct(g['ended_rate'])} | {pct(g['subject_rate'])} | "
             f"{pct(g['repetition_rate'])} |", "",
             "Ends its turn: the answer closes with <|end|> within 64 tokens. Names the subject: the article's title "
             "(without parentheses) appears in the answer. Repeats itself: some word 3-gram three times or more.",
             "", f"Small talk (held-out chatterbot prompts): the chatbot ends its turn {pct(talk['ended_rate'])}, "
             f"repeats itself {pct(talk['repetition_rate'])}.", ""]
    if "seconds" in report:
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in report.get("stage_seconds", {}).items())
        lines += [f"The whole pipeline took {report['seconds'] / 60:.1f} minutes ({stages}).", ""]
    for ex in report["examples"][:examples]:
        lines += [f"Q: {ex['question']}", f"  chat: {ex['chat']!r}", f"  base: {ex['base'][:120]!r}"]
    for ex in report["small_talk_examples"][: max(examples // 3, 1)]:
        lines += [f"Q: {ex['question']}", f"  chat: {ex['answer']!r}"]
    return "\n".join(lines) + "\n"
