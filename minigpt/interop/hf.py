"""Hugging Face GPT-2 format: weights, config, whole runs both ways (`minigpt export`, `minigpt import`).

    minigpt export runs/chat --format hf exports/chat    # a folder transformers loads offline
    minigpt import ~/models/gpt2 runs/gpt2               # a GPT-2 folder (safetensors) -> a run folder

Our parameter names are OpenAI's, so conversion is one rule: Hugging Face's GPT-2 stores its attention and MLP
weights as `Conv1D`, shape (in, out), where we use `nn.Linear`, shape (out, in); those four are transposed. The
token embedding loses (export) or gains (import) the rows that pad our vocabulary to a multiple of 64. A model
without biases exports zero biases, which computes the same function. The tokenizer's conversion lives in
hf_tokenizer.py; the two commands' flags are at the end of this file; what each exported file holds, and the
limits, are in docs/interop.md.

Importing this module imports neither `transformers` nor `tokenizers`, and an export needs neither: tensors and
JSON are plain data (hf_tokenizer.py writes `tokenizer.json` itself).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from minigpt.common import UserError, current_umask, read_json, write_json
from minigpt.common.config import to_dict
from minigpt.interop.hf_tokenizer import load_hf_tokenizer, save_hf_tokenizer
from minigpt.model.gpt import GPT, ModelConfig
from minigpt.runs.checkpoint import save_checkpoint
from minigpt.runs.checksums import CHECKSUMS, CorruptCheckpoint, file_sha256, read_checksums, write_checksums
from minigpt.runs.loading import load_run
from minigpt.text.chat_format import end_of_turn_ids
from minigpt.train.sft import NOT_FOR_SFT  # settings a fine-tuning run records but does not use

# Weights stored transposed in Hugging Face's Conv1D layers.
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under `GPT2LMHeadModel`'s names and layouts (contiguous copies, float as stored)."""
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to wte; Hugging Face re-ties it on load
        tensor = tensor.detach()
        if name == "wte.weight":
            tensor = tensor[: cfg.vocab_size]
        if name.endswith(TRANSPOSED):
            tensor = tensor.t()
        out[f"transformer.{name}"] = tensor.contiguous().clone()
    if not cfg.bias:  # Hugging Face's GPT-2 always has biases: zeros compute the same function
        for name, tensor in list(out.items()):
            if name.endswith(".weight") and (name.endswith(TRANSPOSED) or ".ln_" in name or "ln_f" in name):
                width = tensor.shape[1] if name.endswith(TRANSPOSED) else tensor.shape[0]
                out[name[: -len("weight")] + "bias"] = torch.zeros(width, dtype=tensor.dtype)
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 weights -> our state dict for a model of `config` (which must have bias=True)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue  # old causal-mask buffers; the tied head
        key = name.removeprefix("transformer.")
        if key.endswith(TRANSPOSED):
            tensor = tensor.t()
        if key == "wte.weight":
            padded = torch.zeros(config.padded_vocab_size, tensor.shape[1], dtype=tensor.dtype)
            padded[: tensor.shape[0]] = tensor
            tensor = padded
        out[key] = tensor.contiguous()
    out["lm_head.weight"] = out["wte.weight"]
    return out


def hf_config_dict(config: ModelConfig, **extra: Any) -> dict[str, Any]:
    """`config.json` for `GPT2LMHeadModel` with our shape."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",  # GELU with the tanh approximation, as ours
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        **extra,
    }


def config_from_hf(data: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig from a Hugging Face GPT-2 `config.json`."""
    if data.get("model_type") != "gpt2":
        raise UserError(f"only GPT-2 checkpoints can be imported, this one is {data.get('model_type')!r}")
    if data.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"unsupported activation {data['activation_function']!r}: GPT-2 uses gelu_new")
    if data.get("n_inner") not in (None, 4 * data["n_embd"]):
        raise UserError("only the standard 4x MLP width is supported")
    if not data.get("scale_attn_weights", True) or data.get("scale_attn_by_inverse_layer_idx") \
            or data.get("add_cross_attention"):
        raise UserError("unsupported GPT-2 variant: attention must be scaled by 1/sqrt(head size) only, without "
                        "cross-attention")
    return ModelConfig(n_layer=data["n_layer"], n_head=data["n_head"], n_embd=data["n_embd"],
                       block_size=data.get("n_positions", data.get("n_ctx", 1024)), vocab_size=data["vocab_size"],
                       bias=True, dropout=0.0, layer_norm_eps=data.get("layer_norm_epsilon", 1e-5))


# ----------------------------------------------------------------------------------------------------------------
# Whole runs: export a checkpoint to a Hugging Face folder, import a Hugging Face folder as a run

EXPORT_FORMAT, EXPORT_VERSION = "minigpt-hf-export", 1
# Settings worth a line in the model card, when the run's config.json has them.
CARD_SETTINGS = ("base", "init_from", "corpus", "data", "datasets", "max_steps", "batch_size", "batch_tokens",
                 "seq_len", "lr", "warmup_steps", "weight_decay", "precision", "seed")


def checkpoint_name(which: str) -> str:
    """`latest`, `best`, `step_N` (any zero padding) or a folder name -> the name resolve_checkpoint takes."""
    match = re.fullmatch(r"step_(\d+)", which)
    return f"step_{int(match.group(1)):08d}" if match else which


def export_hf(run: str | os.PathLike, out: str | os.PathLike, which: str = "latest", force: bool = False) -> Path:
    """Write checkpoint `which` of `run` as a Hugging Face GPT-2 folder `out`; returns `out`.

    `out` is built in a temporary folder beside it, with SHA256SUMS listing the files minigpt wrote, and renamed into
    place. An existing folder is replaced only if it is empty or an earlier export holding nothing but the files its
    SHA256SUMS lists, unchanged; `force` writes our files into any folder instead, one atomic rename each, keeping
    the other files there.
    """
    from safetensors.torch import save_file


    model, tokenizer, meta = load_run(run, "cpu", checkpoint_name(which))
    ckpt = Path(meta["checkpoint"])
    if model.config.vocab_size != tokenizer.n_vocab:
        raise UserError(f"{ckpt}: the model has {model.config.vocab_size} token ids but its tokenizer "
                        f"{tokenizer.n_vocab}")
    out = Path(out)
    in_place = _check_export_target(out, force)
    cfg = model.config
    weights = to_hf_state_dict(model)
    dtype = str(weights["transformer.wte.weight"].dtype).removeprefix("torch.")
    provenance = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "checkpoint": str(ckpt.resolve()),
                  "step": meta.get("step"), "verified": meta["verified"], "tokenizer_name": tokenizer.name,
                  "tokenizer_hash": tokenizer.hash}
    eot = tokenizer.eot_id
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        write_json(tmp / "config.json", hf_config_dict(cfg, bos_token_id=eot, eos_token_id=eot, dtype=dtype,
                                                       minigpt=provenance))
        write_json(tmp / "generation_config.json", generation_config(tokenizer))
        save_hf_tokenizer(tokenizer, tmp, cfg.block_size)
        (tmp / "README.md").write_text(model_card(model, tokenizer, meta, _run_root(ckpt), out.name),
                                       encoding="utf-8")
        write_checksums(tmp)
        mask = current_umask()  # mkdtemp makes an owner-only folder: give the folder and files the usual permissions
        os.chmod(tmp, 0o777 & ~mask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~mask)
        _merge_into(tmp, out) if in_place else _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def generation_config(tokenizer) -> dict[str, Any]:
    """Greedy decoding that stops where `minigpt chat` and `minigpt serve` stop (chat.end_of_turn_ids): at
    end-of-text, and at <|end|> too for a tokenizer with the chat tokens.

    No `max_length`: transformers warns on every call that also passes `max_new_tokens` when one is set.
    """
    stops = end_of_turn_ids(tokenizer)
    return {"bos_token_id": tokenizer.eot_id, "eos_token_id": stops if len(stops) > 1 else stops[0],
            "pad_token_id": tokenizer.eot_id, "do_sample": False}


def _run_root(ckpt: Path) -> Path | None:
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def _check_export_target(out: Path, force: bool) -> bool:
    """Refuse (UserError) to overwrite anything but an unchanged earlier export; True where `force` lets us write
    into a folder that holds other files (they are kept)."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise UserError(f"{out} exists and is not a folder: choose another output path")
    if not any(out.iterdir()):
        return False
    if force:
        return True
    try:
        sums = read_checksums(out)
    except CorruptCheckpoint:
        sums = None
    if sums is None:
        raise UserError(f"{out} is not empty and is not a minigpt export with its {CHECKSUMS} (or is one from before "
                        f"exports had it): refusing to overwrite it; choose a new or empty folder, or add --force to "
                        f"write the export's files into it (other files are kept)")
    others = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    others = [p for p in others if p not in sums and p != CHECKSUMS]
    edited = [name for name, digest in sums.items() if (out / name).is_file() and file_sha256(out / name) != digest]
    if others or edited:
        what = "; ".join(filter(None, [f"files minigpt did not write: {_some(others)}" if others else "",
                                       f"files edited since the export: {_some(edited)}" if edited else ""]))
        raise UserError(f"{out} holds {what}: refusing to replace it; move them away or choose another folder, or "
                        f"add --force to overwrite minigpt's files there (other files are kept)")
    return False


def _some(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _merge_into(tmp: Path, final: Path) -> None:
    """--force into a folder with other files: each of our files renamed over its namesake, SHA256SUMS last."""
    names = sorted((f for f in tmp.iterdir()), key=lambda f: f.name == CHECKSUMS)
    for f in names:
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    for f in names:
        os.replace(f, final / f.name)
    tmp.rmdir()


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename a finished folder into place; an existing one is moved aside first and removed afterwards."""
    for f in tmp.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        old.rmdir()
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def model_card(model: GPT, tokenizer, meta: dict[str, Any], run: Path | None, title: str) -> str:
    """README.md for the export: what the model is, how it was made (the run's config.json), its metrics."""
    cfg = model.config
    settings: dict[str, Any] = {}
    if run is not None and (run / "config.json").is_file():
        try:
            settings = json.loads((run / "config.json").read_text())
        except json.JSONDecodeError:
            settings = {}
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [gpt2, minigpt]", "---",
             "", f"# {title}", "",
             f"A GPT-2 language model of {model.num_params():,} parameters ({cfg.n_layer} layers, {cfg.n_head} heads, "
             f"width {cfg.n_embd}, context {cfg.block_size} tokens, vocabulary {cfg.vocab_size}), made with minigpt "
             f"and exported from `{meta['checkpoint']}`. It loads as `GPT2LMHeadModel`.", "", "## How it was made", ""]
    stage = settings.get("stage") or meta.get("stage")
    lines.append({"train": "Pretrained with `minigpt train`.", "sft": "Chat fine-tuned with `minigpt sft`.",
                  "import": f"Imported into minigpt from `{settings.get('source')}`."}.get(
                      stage, f"Made by the minigpt stage `{stage}`." if stage else "How it was made is unknown."))
    skip: tuple[str, ...] = ()
    if stage == "sft":
        skip = NOT_FOR_SFT
    shown = {k: settings[k] for k in CARD_SETTINGS if k not in skip and settings.get(k) not in (None, "", [], 0)}
    shown.update((k, v) for k, v in (settings.get("resolved") or {}).items() if not isinstance(v, dict))  # as run
    if shown:
        lines += ["", "Settings (all of them are in the run's config.json):", ""]
        lines += [f"- {k}: `{v if isinstance(v, str) else json.dumps(v)}`" for k, v in shown.items()]
    lines += ["", f"## Metrics at step {meta.get('step', 0)}", ""]
    metrics = [(k, meta[k]) for k in ("val_loss", "tokens_seen") if meta.get(k) is not None]
    lines += [f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v:,}" for k, v in metrics]
    if "val_loss" not in dict(metrics):
        lines.append("- no validation loss was recorded for this checkpoint")
    lines += ["", "## Tokenizer", "",
              f"Byte-level BPE `{tokenizer.name}` (hash `{tokenizer.hash}`, {tokenizer.pattern_name} split pattern), "
              f"special tokens {', '.join(f'`{s}` = {i}' for s, i in tokenizer.special_tokens.items())}."]
    if tokenizer.chat_token_ids:
        lines += ["", "Chat format (also the tokenizer's `chat_template`): "
                  "`<|endoftext|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>`; replies end at "
                  "`<|end|>`, which generation_config.json lists as an end-of-sequence token."]
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'model = AutoModelForCausalLM.from_pretrained("PATH")',
              'tokenizer = AutoTokenizer.from_pretrained("PATH")']
    if tokenizer.chat_token_ids:
        lines += ['messages = [{"role": "user", "content": "Hello"}]',
                  "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",",
                  "                                       return_dict=True)"]
    else:
        lines.append('inputs = tokenizer("Once upon a time", return_tensors="pt")')
    lines += ["out = model.generate(**inputs, max_new_tokens=50)",
              'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
              "```", "", "Weights and tokenizer are converted exactly: logits and token ids equal minigpt's own "
              "(see minigpt's docs/interop.md).", ""]
    return "\n".join(lines)


def import_hf(source: str | os.PathLike, run: str | os.PathLike) -> Path:
    """Make run folder `run` from a local Hugging Face GPT-2 folder (config.json, safetensors weights, tokenizer).

    The run holds tokenizer.json (our format), config.json (where it came from) and checkpoint step 0, so
    `train --init-from`, `sft --base`, `eval`, `chat` and `serve` take it like any run. Weights become float32.
    """
    source, run = Path(source), Path(run)
    if not source.is_dir():
        raise UserError(f"{source} is not a folder: give a local Hugging Face model folder (config.json, "
                        "model.safetensors, tokenizer files)")
    if run.exists() and (not run.is_dir() or any(run.iterdir())):
        raise UserError(f"{run} already exists and is not empty: choose a new run folder")
    hf_config = read_json(source / "config.json")
    if not isinstance(hf_config, dict):
        raise UserError(f"{source / 'config.json'} is not a model configuration")
    architectures = hf_config.get("architectures") or ["GPT2LMHeadModel"]
    if hf_config.get("model_type") == "gpt2" and not set(architectures) <= {"GPT2LMHeadModel", "GPT2Model"}:
        raise UserError(f"architecture {architectures[0]} is not supported: only GPT2LMHeadModel (or GPT2Model)")
    try:
        config = config_from_hf(hf_config)
    except KeyError as exc:
        raise UserError(f"{source / 'config.json'} lacks {exc.args[0]!r}: not a GPT-2 configuration") from None
    weights = read_hf_weights(source)
    provenance = hf_config.get("minigpt")  # our own exports carry the tokenizer's name
    tokenizer = load_hf_tokenizer(source, provenance.get("tokenizer_name") if isinstance(provenance, dict) else None)
    config = _fit_vocabulary(config, tokenizer.n_vocab, weights)
    with torch.device("meta"):
        model = GPT(config)
    try:
        state = from_hf_state_dict(weights, config)
        model.load_state_dict(state, assign=True)
    except (RuntimeError, KeyError) as exc:
        raise UserError(f"the weights in {source} do not fit a GPT-2 of this shape: {str(exc)[:300]}") from None
    model.lm_head.weight = model.wte.weight
    run.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{run.name}.", suffix=".tmp", dir=run.parent))
    try:
        tokenizer.save(tmp / "tokenizer.json")
        write_json(tmp / "config.json", {"stage": "import", "source": str(source.resolve()),
                                         "model": to_dict(config), "tokenizer": tokenizer.name,
                                         "tokenizer_hash": tokenizer.hash, "hf_config": hf_config})
        save_checkpoint(tmp, model, 0, {"stage": "import", "tokenizer_hash": tokenizer.hash, "val_loss": None,
                                        "source": str(source.resolve())})
        if run.exists():
            run.rmdir()  # empty, checked above
        tmp.rename(run)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run


def read_hf_weights(source: Path) -> dict[str, torch.Tensor]:
    """A folder's safetensors weights (one file or shards listed in an index), as float32 tensors.

    Pickled weights (`pytorch_model.bin`) are refused: unpickling can run arbitrary code hidden in the file.
    """
    from safetensors.torch import load_file

    files = [source / "model.safetensors"]
    index = source / "model.safetensors.index.json"
    if not files[0].is_file() and index.is_file():
        files = [source / f for f in sorted(set(read_json(index).get("weight_map", {}).values()))]
    if not all(f.is_file() for f in files) or not files:
        pickled = sorted(p.name for p in source.glob("*.bin")) + sorted(p.name for p in source.glob("*.pt"))
        if pickled:
            raise UserError(f"{source} holds only pickled weights ({pickled[0]}); minigpt loads safetensors only, "
                            "because unpickling a file can run code hidden in it. Convert it once where you trust "
                            "it (see docs/interop.md), then import the folder")
        raise UserError(f"{source} has no model.safetensors")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            weights.update(load_file(f))
        except Exception as exc:  # safetensors reports a damaged file with its own exception type
            raise UserError(f"{f} is not a readable safetensors file ({exc})") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}


def _fit_vocabulary(config: ModelConfig, n_vocab: int, weights: dict[str, torch.Tensor]) -> ModelConfig:
    """Size the model to the tokenizer; drop embedding rows past it (padding); insist on a tied output head."""
    wte_key = next((k for k in weights if k.removeprefix("transformer.") == "wte.weight"), None)
    if wte_key is None:
        raise UserError("the weights have no token embedding (wte.weight): not a GPT-2 checkpoint")
    wte = weights[wte_key]
    if n_vocab > wte.shape[0]:
        raise UserError(f"the tokenizer has {n_vocab} ids but the model only {wte.shape[0]} embedding rows")
    head = weights.get("lm_head.weight")
    if head is not None and not torch.equal(head, wte):
        raise UserError("the output head is not tied to the token embedding: minigpt's GPT-2 ties them")
    weights[wte_key] = wte[:n_vocab]
    return dataclasses.replace(config, vocab_size=n_vocab)
