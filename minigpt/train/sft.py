"""`minigpt sft`: supervised fine-tuning of a pretrained run into a chatbot, through the same training loop.

    minigpt sft --base runs/tiny --run-dir runs/tiny-chat                        # bundled conversations
    minigpt sft --base runs/gpt2 --datasets my_chats.jsonl alpaca.json*2         # your own, one repeated
    minigpt sft --config gpt2-124m-sft                                           # SmolTalk for GPT-2 124M

Three modules do the work: text/conversations.py reads sources (files, folders, hub datasets, bundled sets) and turns
records of the common shapes into messages; data/sft_data.py tokenizes each source once, in parallel, onto disk (a
cache reused by later runs); data/sft_batches.py packs the conversations into rows for the loop in train.py. The loss
counts the assistant's tokens and their <|end|> only, and the loop divides it by the number of those in the whole
step, so a conversation weighs by its assistant tokens. A deterministic share of conversations (a hash of each
one's key) is held out; each evaluation scores the same `--eval-batches` batches of them.

`dataset_facts(cfg)` says what a run would train on (conversations, tokens, rows, fill) without training.
docs/sft.md has the commands, the formats and the measured figures.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigpt.chat.engine import Engine, SamplingParams
from minigpt.chat.session import ChatSession
from minigpt.common import UserError, print0
from minigpt.common.config import opt
from minigpt.data.sft_batches import (
    ConversationBatches,
    ConversationSet,
    Part,
    evaluation_rows,
    held_out_loss,
    plan_epoch,
)
from minigpt.data.sft_data import (
    PreparedSource,
    PrepareSettings,
    default_cache_dir,
    open_prepared,
    prepare_source,
    prepared_folder,
)
from minigpt.model.gpt import GPT, logit_chunk_rows
from minigpt.runs.loading import (
    latest_checkpoint,
    load_run,
    read_checkpoint_meta,
    resolve_checkpoint,
    run_tokenizer_path,
)
from minigpt.runs.runtime import Runtime, autocast_context, barrier, resolve_precision, setup_runtime
from minigpt.runs.tracking import check_packages, tracker_names
from minigpt.text.chat_format import Conversation, render, stop_ids
from minigpt.text.conversations import (
    FieldMap,
    parse_source,
)
from minigpt.text.tokenizer import Tokenizer
from minigpt.train.data import TrainData
from minigpt.train.train import TrainConfig, train


@dataclasses.dataclass
class SFTConfig(TrainConfig):
    """Settings of `minigpt sft`: the training loop's, with fine-tuning defaults."""

    base: str = opt("runs/tiny", "the pretrained run (or checkpoint) to fine-tune")
    datasets: list[str] = opt(["chatterbot", "wiki-qa"], "conversation sources: chatterbot, wiki-qa, .jsonl/.json/"
                                                         ".parquet files, folders, globs, hf:NAME[:CONFIG[:SPLIT]]; "
                                                         "SOURCE*3 repeats a source, SOURCE*0.5 takes half of it")
    fields: list[str] = opt([], "where records keep their conversation when the names differ from the OpenAI, "
                                "ShareGPT and Alpaca ones: messages=, role=, content=, prompt=, input=, response=, "
                                "system=, or SPEAKER=user/assistant/system (docs/sft.md)")
    held_out: float = opt(0.05, "share of conversations held out for evaluation")
    pack: bool = opt(True, "pack several conversations into each row, each attending only to itself (off: one "
                           "padded conversation per row)")
    epochs: float = opt(0.0, "passes over the training rows; when > 0 this sets max_steps")
    sft_cache: str = opt("", "folder of tokenized conversations, reused by later runs (default: $MINIGPT_CACHE/sft "
                             "or ~/.cache/minigpt/sft)")
    workers: int = opt(0, "tokenizer processes when preparing conversations (0: one per CPU core)")
    run_dir: str = opt("runs/tiny-chat", "folder for the fine-tuned checkpoints and logs")
    batch_size: int = opt(8, "rows per micro-batch, per process (8 packed rows of 256 tokens cost about what 16 "
                                "padded conversations did)")
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
        if self.epochs < 0 or self.workers < 0:
            raise ValueError("epochs and workers may not be negative")
        if not self.datasets:
            raise ValueError("give at least one conversation source")


# TrainConfig fields that mean nothing when fine-tuning (the base run fixes data, model and tokenizer).
NOT_FOR_SFT = ("data", "corpus", "vocab_size", "model", "init_from", "seq_len")


# ----------------------------------------------------------------------------------------------------------------
# The data


def prepare_data(cfg: SFTConfig, tokenizer, rt: Runtime | None = None, quiet: bool = False
                 ) -> list[PreparedSource]:
    """Each source of `cfg.datasets` tokenized (or found prepared before). Under torchrun the first process of each
    machine prepares while the others wait, then every process opens the result. A source with nothing usable in
    it is a warning; all of them, an error."""
    settings = PrepareSettings(FieldMap.parse(cfg.fields), cfg.held_out, cfg.seed, cfg.workers)
    sources = [parse_source(s).source for s in cfg.datasets]
    if rt is None or rt.local_rank == 0:
        prepared = [prepare_source(s, tokenizer, settings, cfg.sft_cache or None, quiet) for s in sources]
    if rt is not None:
        barrier(rt)
        if rt.local_rank != 0:
            cache = Path(cfg.sft_cache) if cfg.sft_cache else default_cache_dir()
            prepared = [open_prepared(s, prepared_folder(s, tokenizer, settings, cache)) for s in sources]
    if all(p.empty for p in prepared):
        if rt is None or rt.local_rank == 0:  # nothing worth keeping: no cache of unusable data
            for p in prepared:
                shutil.rmtree(p.folder, ignore_errors=True)
        raise UserError("; ".join(dict.fromkeys(p.problem() for p in prepared)))
    if not quiet and (rt is None or rt.rank == 0):
        for problem in dict.fromkeys(p.problem() for p in prepared if p.empty):  # beside usable sources: a warning
            print(f"warning: {problem}", file=sys.stderr)
    return prepared


def conversation_sets(cfg: SFTConfig, prepared: Sequence[PreparedSource], window: int
                      ) -> tuple[ConversationSet, ConversationSet]:
    weights = [parse_source(s).weight for s in cfg.datasets]
    train_parts = [Part(p.split("train"), w, p.folder.name) for p, w in zip(prepared, weights, strict=True)]
    val_parts = [Part(p.split("val"), 1.0, p.folder.name) for p in prepared]
    return ConversationSet(train_parts, window), ConversationSet(val_parts, window)


def _rows_facts(convs: ConversationSet, rows: list[np.ndarray], batch_size: int, packed: bool) -> dict[str, Any]:
    ids = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    real = int(convs.positions[ids].sum())
    if packed:
        computed = len(rows) * convs.window
    else:  # a padded batch is as wide as its longest row
        widths = [convs.positions[np.concatenate(rows[i:i + batch_size])].max() * len(rows[i:i + batch_size])
                  for i in range(0, len(rows), batch_size)]
        computed = int(sum(widths))
    return {"conversations": len(ids), "positions": real, "trained_tokens": convs.trained_tokens(ids),
            "truncated": int(convs.truncated[ids].sum()), "rows": len(rows), "fill": real / max(computed, 1)}


def dataset_facts(cfg: SFTConfig, quiet: bool = True) -> dict[str, Any]:
    """What `minigpt sft` with these settings trains on, without training (the data is prepared if needed).

    Per source: conversations (training and held out), tokens, the assistant's tokens, what was left out and why.
    For the run: one epoch's conversations (weights applied), positions, trained tokens (within the window),
    conversations cut at the window, rows after packing, the fill (real tokens / computed positions), the
    optimizer steps an epoch takes (one process), and the conversations left out because no assistant token falls
    inside the window; the held-out rows and those each evaluation scores.
    """
    ckpt = resolve_checkpoint(cfg.base)
    window = int(read_checkpoint_meta(ckpt)["model"]["block_size"])
    tokenizer = Tokenizer.load(run_tokenizer_path(ckpt)).with_chat_tokens()
    prepared = prepare_data(cfg, tokenizer, quiet=quiet)
    train_set, val_set = conversation_sets(cfg, prepared, window)
    train_rows = plan_epoch(train_set, cfg.seed, 0, cfg.pack)
    val_rows = evaluation_rows(val_set, cfg.seed, cfg.pack)
    rows_per_step = cfg.batch_size * max(cfg.batch_tokens // (cfg.batch_size * window), 1)
    sources = []
    for spec, p in zip(cfg.datasets, prepared, strict=True):
        counts = p.meta["splits"]
        sources.append({"source": p.source, "weight": parse_source(spec).weight, "folder": str(p.folder),
                        "conversations": counts["train"]["conversations"],
                        "held_out": counts["val"]["conversations"], "tokens": counts["train"]["tokens"],
                        "trained_tokens": counts["train"]["trained_tokens"], "skipped": p.meta["skipped"]})
    train_facts = _rows_facts(train_set, train_rows, cfg.batch_size, cfg.pack)
    train_facts["steps_per_epoch"] = math.ceil(len(train_rows) / rows_per_step)
    train_facts["beyond_window"] = int((~train_set.usable).sum())  # no answer in the window: never used
    val_facts = _rows_facts(val_set, val_rows, cfg.batch_size, cfg.pack)
    val_facts["evaluated_rows"] = min(len(val_rows), cfg.eval_batches * cfg.batch_size) or len(val_rows)
    return {"window": window, "packed": cfg.pack, "sources": sources, "train": train_facts, "held_out": val_facts}


def fine_tuning_data(cfg: SFTConfig, model: GPT, tokenizer, rt: Runtime) -> TrainData:
    prepared = prepare_data(cfg, tokenizer, rt)
    train_set, val_set = conversation_sets(cfg, prepared, model.config.block_size)
    pad = tokenizer.eot_id
    batches = ConversationBatches(train_set, cfg.batch_size, pad, cfg.seed, rt.rank, rt.world, rt.device, cfg.pack)
    eval_rows = evaluation_rows(val_set, cfg.seed, cfg.pack, cfg.eval_batches * cfg.batch_size * rt.world)
    if not eval_rows:
        raise UserError("no held-out conversation: raise --held-out or add conversations")
    precision = resolve_precision(cfg.precision, rt.device)
    # chunked head and loss when scoring: the (rows, window, vocabulary) logits are never held at once
    chunk_rows = logit_chunk_rows(rt.device, model.config.padded_vocab_size)
    question = cfg.sample_prompt

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        with autocast_context(precision, rt.device):
            loss = held_out_loss(m, val_set, eval_rows, pad, cfg.batch_size, cfg.pack, chunk_rows, rt.rank, rt.world)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}

    def sample(m: GPT) -> str:
        session = ChatSession(m, tokenizer, temperature=0, max_new_tokens=48)
        answer = "".join(session.reply(question))
        m.train()
        return f"{question} -> {answer}"

    describe = ""
    if rt.rank == 0:  # (counting the trained tokens of cut conversations reads them: once is enough)
        facts = _rows_facts(train_set, batches.plan(0), cfg.batch_size, cfg.pack)
        describe = (f"{facts['conversations']:,} training conversations an epoch ({facts['trained_tokens']:,} "
                    f"assistant tokens, {facts['truncated']:,} cut at the window) in {facts['rows']:,} "
                    f"{'packed' if cfg.pack else 'padded'} rows (fill {facts['fill']:.1%}); {len(eval_rows):,} "
                    f"held-out rows scored at each evaluation")
    return TrainData(tokenizer, batches, evaluate, describe, sample=sample if question else None,
                     train_metrics=batches.metrics)


# ----------------------------------------------------------------------------------------------------------------
# Answer quality: does the model keep the format, and does it talk about what was asked?


def _subject_key(title: str) -> str:
    return re.sub(r"\s*\(.*?\)\s*", " ", title).strip().lower()


def repeats_itself(text: str, n: int = 3, times: int = 3) -> bool:
    """Degenerate repetition: some word `n`-gram occurs `times` or more times ("of the family of the family of the
    family" repeats "of the family" three times). Words are lower-cased runs of letters and digits."""
    words = re.findall(r"\w+", text.lower())
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - n + 1):
        gram = tuple(words[i : i + n])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] >= times:
            return True
    return False


@torch.no_grad()
def answer_quality(model: GPT, tokenizer, convs: Sequence[Conversation], max_new_tokens: int = 64,
                   batch: int = 16, params: Any = None) -> dict[str, Any]:
    """Answers to each conversation's first user message, greedy unless `params` (engine.SamplingParams) say how
    to sample (their stop tokens are replaced by the chat's end of turn).

    `ended_rate`: answers that end with <|end|> within `max_new_tokens` (the chat format kept);
    `subject_rate`: for questions about an article, answers that name its subject (title without parentheses);
    `repetition_rate`: answers with a word 3-gram three or more times (`repeats_itself`), the looping of greedy
    decoding in small models.
    """
    prompts = [render(tokenizer, c.messages[:1], add_generation_prompt=True)[0] for c in convs]
    base = params if params is not None else SamplingParams(temperature=0)
    params = dataclasses.replace(base, max_new_tokens=max_new_tokens, stop_token_ids=stop_ids(tokenizer))
    with Engine(model, max_batch=batch, seed=0) as engine:
        completions = engine.generate(prompts, params)
    answers = [tokenizer.decode(c.tokens).strip() for c in completions]
    ended = [c.finish_reason == "stop" and bool(a) for c, a in zip(completions, answers, strict=True)]
    about = [(c.subject, a) for c, a in zip(convs, answers, strict=True) if c.subject]
    subject_hits = [_subject_key(s) in a.lower() for s, a in about]
    repeated = [repeats_itself(a) for a in answers]
    n = max(len(convs), 1)
    return {"questions": len(convs), "ended_rate": sum(ended) / n, "repetition_rate": sum(repeated) / n,
            "subject_questions": len(about), "subject_rate": sum(subject_hits) / max(len(about), 1),
            "answers": [{"question": c.messages[0].content, "answer": a, "ended": e, "repeats": r}
                        for c, a, e, r in zip(convs, answers, ended, repeated, strict=True)]}


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


def finetune(cfg: SFTConfig) -> Path:
    check_packages(tracker_names(cfg.tracker, cfg.tensorboard))  # before preparing any data, not after
    rt = setup_runtime(cfg.device)
    base_model, tokenizer, _ = load_run(cfg.base, rt.device)
    tokenizer = tokenizer.with_chat_tokens()  # our tokenizers already have them; GPT-2's gains four
    model = grow_vocabulary(base_model, tokenizer.n_vocab)
    if latest_checkpoint(cfg.run_dir) is not None and cfg.resume:
        model = None  # the loop loads the fine-tuned weights from the run itself
    data = fine_tuning_data(cfg, base_model if model is None else model, tokenizer, rt)
    if cfg.epochs:
        window = base_model.config.block_size
        accum = max(cfg.batch_tokens // (cfg.batch_size * window * rt.world), 1)
        rows_per_step = cfg.batch_size * rt.world * accum
        steps = max(math.ceil(cfg.epochs * data.train.rows_in_epoch(0) / rows_per_step), 1)
        print0(f"{cfg.epochs:g} epochs of {data.train.rows_in_epoch(0):,} rows, {rows_per_step} rows a step: "
               f"{steps:,} steps")
        cfg = dataclasses.replace(cfg, max_steps=steps)
    return train(cfg, data=data, model=model, stage="sft")
