"""`minigpt quickstart`: the whole pipeline on a CPU in minutes, in one folder, resumable.

    minigpt quickstart                         # runs/quickstart/{data,base,chat,report.md}

1. data   a BPE vocabulary (8,192 tokens, chat tokens included) trained on the bundled Wikipedia summaries,
          then token shards with 2% of the articles held out                                  -> RUN/data
2. base   pretraining of the tiny preset on those shards                                       -> RUN/base
3. chat   supervised fine-tuning on bundled conversations: chatterbot dialogues and questions about the
          Wikipedia articles                                                                   -> RUN/chat
4. report held-out questions answered by the base model and the chatbot, prompted alike: how often the answer
          ends properly (the chat format) and names the subject asked about                    -> RUN/report.md

A second call finds what is done and goes on from there (finished stages are skipped, an interrupted one
resumes from its last checkpoint). Each stage is the same code as its own command: `minigpt train`, `minigpt sft`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from minigpt import config as configlib
from minigpt.checkpoint import latest_checkpoint, load_run, read_checkpoint_meta
from minigpt.common import print0, write_json
from minigpt.config import opt
from minigpt.model import ModelConfig


@dataclasses.dataclass
class QuickstartConfig:
    """Settings of `minigpt quickstart`."""

    run_dir: str = opt("runs/quickstart", "folder for everything the quickstart makes")
    pretrain_steps: int = opt(500, "pretraining steps (16 x 256 tokens each)")
    sft_steps: int = opt(300, "fine-tuning steps (8 rows of 256 tokens each, packed with conversations)")
    questions: int = opt(100, "held-out questions for the report")
    device: str = opt("auto", "auto, cpu, cuda, mps")
    seed: int = opt(1337, "seed for everything")


def _finished(run: Path, steps: int) -> bool:
    ckpt = latest_checkpoint(run)
    return ckpt is not None and read_checkpoint_meta(ckpt)["step"] >= steps


def quickstart(cfg: QuickstartConfig) -> Path:
    from minigpt.sft import SFTConfig, finetune
    from minigpt.train import TrainConfig, build_data, train

    root = Path(cfg.run_dir)
    base, chat = root / "base", root / "chat"

    print0(f"== 1-2. data and pretraining -> {base}")
    if _finished(base, cfg.pretrain_steps):
        print0(f"pretraining already done ({cfg.pretrain_steps} steps): skipped")
    else:
        pretrain = TrainConfig(run_dir=str(base), data=str(root / "data"), model=ModelConfig.from_preset("tiny"),
                               max_steps=cfg.pretrain_steps, warmup_steps=min(50, cfg.pretrain_steps // 10),
                               eval_every=max(cfg.pretrain_steps // 5, 1),
                               checkpoint_every=max(cfg.pretrain_steps // 5, 1), device=cfg.device, seed=cfg.seed,
                               resume=True)
        if not (root / "data" / "meta.json").exists():
            build_data(pretrain)  # train builds only its default --data; this folder is the quickstart's own
        train(pretrain)

    print0(f"== 3. fine-tuning into a chatbot -> {chat}")
    if _finished(chat, cfg.sft_steps):
        print0(f"fine-tuning already done ({cfg.sft_steps} steps): skipped")
    else:
        finetune(SFTConfig(base=str(base), run_dir=str(chat), max_steps=cfg.sft_steps,
                           eval_every=max(cfg.sft_steps // 3, 1), checkpoint_every=max(cfg.sft_steps // 6, 1),
                           device=cfg.device, seed=cfg.seed, resume=True))

    print0("== 4. questions the chatbot never saw")
    report = compare_on_held_out(base, chat, cfg.questions, cfg.seed)
    write_json(root / "report.json", report)
    (root / "report.md").write_text(report_markdown(report))
    print0(report_markdown(report, examples=6))
    print0(f"Talk to it:  minigpt chat {chat}\nEverything is in {root}/")
    return root


@torch.no_grad()
def compare_on_held_out(base: Path, chat: Path, n_questions: int, seed: int) -> dict:
    """Ask the base model and the chatbot the same held-out questions, prompted the same way (the chat format)."""
    from minigpt.sft import answer_quality, load_conversations, split_conversations

    _, held = split_conversations(load_conversations(["wiki-qa"]), 0.05, seed)
    held = held[:n_questions]
    chat_model, tokenizer, chat_meta = load_run(chat)
    base_model, _, base_meta = load_run(base)
    if base_model.config.vocab_size != tokenizer.n_vocab:  # GPT-2's vocabulary: the base lacks the chat tokens
        from minigpt.sft import grow_vocabulary

        base_model = grow_vocabulary(base_model, tokenizer.n_vocab).eval()
    chat_q = answer_quality(chat_model, tokenizer, held)
    base_q = answer_quality(base_model, tokenizer, held)
    small_talk = load_conversations(["chatterbot"])
    _, small_held = split_conversations(small_talk, 0.05, seed)
    talk = answer_quality(chat_model, tokenizer, small_held[:20])
    return {"questions": len(held), "base": {k: v for k, v in base_q.items() if k != "answers"},
            "chat": {k: v for k, v in chat_q.items() if k != "answers"},
            "chat_small_talk": {k: v for k, v in talk.items() if k != "answers"},
            "base_val_loss": base_meta.get("val_loss"), "chat_val_loss": chat_meta.get("val_loss"),
            "examples": [{"question": c["question"], "chat": c["answer"], "base": b["answer"]}
                         for c, b in zip(chat_q["answers"], base_q["answers"], strict=True)],
            "small_talk_examples": talk["answers"]}


def report_markdown(report: dict, examples: int = 10) -> str:
    b, c, talk = report["base"], report["chat"], report["chat_small_talk"]
    lines = [f"Held-out Wikipedia questions ({report['questions']}), greedy answers, same chat-format prompt:", "",
             "| model | ends with <\\|end\\|> | names the subject |", "|---|---|---|",
             f"| base (pretrained only) | {100 * b['ended_rate']:.0f}% | {100 * b['subject_rate']:.0f}% |",
             f"| chat (fine-tuned) | {100 * c['ended_rate']:.0f}% | {100 * c['subject_rate']:.0f}% |", "",
             f"Small talk (held-out chatterbot prompts): the chatbot ends properly {100 * talk['ended_rate']:.0f}%",
             ""]
    for ex in report["examples"][:examples]:
        lines += [f"Q: {ex['question']}", f"  chat: {ex['chat']!r}", f"  base: {ex['base'][:120]!r}"]
    for ex in report["small_talk_examples"][: max(examples // 3, 1)]:
        lines += [f"Q: {ex['question']}", f"  chat: {ex['answer']!r}"]
    return "\n".join(lines) + "\n"


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="TOML, YAML or JSON file of settings (flags override it)")
    configlib.add_arguments(parser, QuickstartConfig)


def main(args) -> None:
    quickstart(configlib.config_from_args(QuickstartConfig, args))

