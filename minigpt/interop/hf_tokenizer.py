"""Our tokenizer <-> Hugging Face's tokenizer files, both ways, with nothing lost.

Export (`tokenizer_json`, `save_hf_tokenizer`) writes the `tokenizer.json` that `tokenizers` reads, as plain JSON
(no library needed: export works on a base install; a test checks it equals what `tokenizers` itself builds):

    our ranks ----derive_merges----> BPE vocab + merges (tokens spelt in GPT-2's byte-to-character alphabet)
    our regex ----------------------> pre-tokenizer: ByteLevel (GPT-2's pattern) or Split(regex) + ByteLevel
    our special tokens -------------> added special tokens at the same ids
    chat format (minigpt/chat/session.py) --> a Jinja `chat_template` in tokenizer_config.json

Our ids are ranks: encoding merges the adjacent pair whose concatenation has the lowest rank (tiktoken's rule).
Hugging Face's BPE instead merges the adjacent pair that comes first in its merge list. The two agree when merge
k is the pair that forms the k-th multi-byte token and that pair is the one our rule reaches just before the token:
the pieces you get by encoding the token's own bytes with only the tokens ranked below it. `derive_merges` computes
exactly that, and for GPT-2's vocabulary it reproduces OpenAI's `vocab.bpe` line for line (tested).

Import (`load_hf_tokenizer`) reads `tokenizer.json`, or GPT-2's `vocab.json` + `merges.txt`, and accepts only what
our format represents exactly: a byte-level BPE whose ids are its merge order, all 256 single bytes, a known
pre-split pattern, special tokens after the ordinary ones, and merges equal to the ones derived from the ranks.

Neither direction needs `tokenizers`: only `to_hf_tokenizer`, which returns a live `tokenizers.Tokenizer`, imports it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from minigpt.common import UserError, read_json, write_json
from minigpt.text import _bpe
from minigpt.text.chat_format import chat_template
from minigpt.text.tokenizer import ENDOFTEXT, PATTERNS, Tokenizer, gpt2_byte_chars

# GPT-2's printable stand-ins for bytes (the alphabet of `vocab.json`, `merges.txt` and `tokenizer.json`).
CHAR_OF_BYTE = {b: c for c, b in gpt2_byte_chars().items()}
BYTE_OF_CHAR = {c: b for b, c in CHAR_OF_BYTE.items()}


def to_chars(token: bytes) -> str:
    return "".join(CHAR_OF_BYTE[b] for b in token)


def to_bytes(text: str, where: str) -> bytes:
    try:
        return bytes(BYTE_OF_CHAR[c] for c in text)
    except KeyError as exc:
        raise UserError(f"{where}: token {text!r} is not spelt in GPT-2's byte-level alphabet ({exc.args[0]!r}); "
                        "only byte-level BPE tokenizers can be imported") from None


# ----------------------------------------------------------------------------------------------------------------
# Merges and patterns


def ordinary_tokens(tok: Tokenizer) -> list[bytes]:
    """Token i's bytes for every id below the special tokens (i = rank)."""
    return [tok.token_bytes(i) for i in range(tok.n_vocab - len(tok.special_tokens))]


def derive_merges(vocab: list[bytes]) -> list[tuple[int, int]]:
    """For each multi-byte token in rank order, the two lower-ranked tokens that merge into it.

    The token's bytes are encoded by our rule with only the ranks below its own: the two pieces left are what the
    encoder holds just before it forms this token. Raises ValueError for a token that lower ranks cannot reach in
    one merge (impossible in a vocabulary built by BPE training; see docs/interop.md).
    """
    ranks = {t: i for i, t in enumerate(vocab)}
    merges = []
    for i, token in enumerate(vocab):
        if len(token) == 1:
            continue
        if len(token) == 2:  # the common case, answered without the encoder
            parts = [ranks[token[:1]], ranks[token[1:]]]
        else:
            parts = _bpe.reference_encode_chunk(token, ranks, max_rank=i)
        if len(parts) != 2:
            raise ValueError(f"token {i} ({token!r}) is not one merge of two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


def hf_pattern(pattern: str) -> str:
    """Our regex in the dialect of `tokenizers` (Oniguruma, Ruby syntax).

    Ruby reads `{1,3}+` as "one to three, repeated" rather than a possessive interval, which would put any number
    of digits in one piece. Dropping that `+` changes nothing for our patterns: each interval ends its alternative,
    so there is nothing to backtrack into. `++` and `?+` mean the same in both dialects and stay.
    """
    return re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pattern)


def _pattern_name(pattern: str) -> str | None:
    return next((name for name, p in PATTERNS.items() if pattern in (p, hf_pattern(p))), None)


# ----------------------------------------------------------------------------------------------------------------
# Export


def tokenizer_json(tok: Tokenizer) -> dict[str, Any]:
    """The content of `tokenizer.json`: a byte-level BPE that encodes and decodes exactly as `tok` does."""
    vocab = ordinary_tokens(tok)
    try:
        merges = derive_merges(vocab)
    except ValueError as exc:
        raise UserError(f"tokenizer {tok.name} cannot be written as Hugging Face BPE: {exc}") from None
    chars = [to_chars(t) for t in vocab]
    if tok.pattern == PATTERNS["gpt2"]:  # ByteLevel's own regex is GPT-2's
        pre_tokenizer: dict[str, Any] = _byte_level(use_regex=True)
    else:
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": hf_pattern(tok.pattern)}, "behavior": "Isolated",
             "invert": False},
            _byte_level(use_regex=False)]}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for s, i in tok.special_tokens.items()],
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        # offsets only; adds no tokens
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        # ignore_merges: a piece that is itself a token is that token, as in tiktoken (and Llama 3's tokenizer.json)
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {c: i for i, c in enumerate(chars)},
                  "merges": [[chars[a], chars[b]] for a, b in merges]},
    }


def _byte_level(use_regex: bool) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def to_hf_tokenizer(tok: Tokenizer):
    """A live `tokenizers.Tokenizer` (needs the library) built from `tokenizer_json`."""
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_str(json.dumps(tokenizer_json(tok)))


def tokenizer_config(tok: Tokenizer, model_max_length: int) -> dict[str, Any]:
    """`tokenizer_config.json`: the class to load, special-token roles, and the chat template."""
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # the pipeline comes from tokenizer.json, as written
        "model_max_length": model_max_length,
        "bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT, "unk_token": None,
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # True would rewrite " ." as "." when decoding
        "added_tokens_decoder": {str(i): {"content": s, "special": True, "normalized": False, "lstrip": False,
                                          "rstrip": False, "single_word": False}
                                 for s, i in tok.special_tokens.items()},
    }
    template = chat_template(tok)
    if template is not None:
        config["chat_template"] = template
    return config


def save_hf_tokenizer(tok: Tokenizer, folder: str | Path, model_max_length: int) -> list[str]:
    """Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`; returns the names."""
    folder = Path(folder)
    write_json(folder / "tokenizer.json", tokenizer_json(tok))
    write_json(folder / "tokenizer_config.json", tokenizer_config(tok, model_max_length))
    write_json(folder / "special_tokens_map.json", {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT,
                                                    "pad_token": ENDOFTEXT})
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


# ----------------------------------------------------------------------------------------------------------------
# Import


def load_hf_tokenizer(folder: str | Path, name: str | None = None) -> Tokenizer:
    """Our Tokenizer from a Hugging Face folder: `tokenizer.json` if present, else `vocab.json` + `merges.txt`.

    Refuses (UserError) anything our format cannot reproduce exactly; see the module docstring.
    """
    folder = Path(folder)
    name = name or f"hf-{folder.resolve().name}"
    if (folder / "tokenizer.json").is_file():
        vocab, merges, added, pattern = _read_tokenizer_json(folder / "tokenizer.json")
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab, merges, added, pattern = _read_vocab_merges(folder)
    else:
        raise UserError(f"{folder} has no tokenizer: it needs tokenizer.json, or vocab.json and merges.txt")
    return _build(folder, vocab, merges, added, pattern, name)


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]], dict[str, int], str]:
    data = read_json(path)
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"{path}: only byte-level BPE tokenizers can be imported, this model is {model.get('type')!r}")
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            raise UserError(f"{path}: BPE option {key}={model[key]!r} is not supported")
    if model.get("byte_fallback"):
        raise UserError(f"{path}: byte_fallback BPE (SentencePiece style) is not byte-level BPE")
    if data.get("normalizer"):
        raise UserError(f"{path}: a normalizer ({data['normalizer'].get('type')}) is not supported")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    return model.get("vocab", {}), merges, added, _read_pre_tokenizer(path, data.get("pre_tokenizer"))


def _read_pre_tokenizer(path: Path, pre: dict[str, Any] | None) -> str:
    """The pattern of a pre-tokenizer we can reproduce: GPT-2's ByteLevel, or Split(known regex) + ByteLevel."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and steps[0] and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True) \
            and not steps[0].get("add_prefix_space"):
        return PATTERNS["gpt2"]
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel" \
            and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space") \
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        pattern_name = _pattern_name(regex or "")
        if pattern_name:
            return PATTERNS[pattern_name]
        raise UserError(f"{path}: unknown split pattern {regex!r}: only GPT-2's and GPT-4's patterns are supported")
    raise UserError(f"{path}: unsupported pre-tokenizer {json.dumps(pre)[:200]}: byte-level BPE with GPT-2's or "
                    "GPT-4's split pattern (and no prefix space) is needed")


def _read_vocab_merges(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]], dict[str, int], str]:
    """GPT-2's two files; extra tokens from added_tokens.json and tokenizer_config.json's added_tokens_decoder."""
    vocab = read_json(folder / "vocab.json")
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    added: dict[str, int] = {}
    if (folder / "added_tokens.json").is_file():
        added.update(read_json(folder / "added_tokens.json"))
    if (folder / "tokenizer_config.json").is_file():
        decoder = read_json(folder / "tokenizer_config.json").get("added_tokens_decoder") or {}
        added.update({t["content"]: int(i) for i, t in decoder.items()})
    # Ids past the merges cannot come out of BPE: they are special tokens (GPT-2's <|endoftext|> is 50256).
    added.update({t: i for t, i in vocab.items() if i >= 256 + len(merges)})
    return vocab, merges, added, PATTERNS["gpt2"]


def _build(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]], added: dict[str, int],
           pattern: str, name: str) -> Tokenizer:
    ordinary = {t: i for t, i in vocab.items() if t not in added}
    if sorted(ordinary.values()) != list(range(len(ordinary))):
        raise UserError(f"{folder}: the ordinary tokens are not numbered 0..{len(ordinary) - 1} (special tokens "
                        "first or ids missing): our tokenizer keeps special tokens after the vocabulary")
    tokens = [to_bytes(t, str(folder)) for t in sorted(ordinary, key=ordinary.get)]
    specials = dict(sorted(added.items(), key=lambda kv: kv[1]))
    try:
        tok = Tokenizer(tokens, specials, pattern, name=name)
    except ValueError as exc:
        raise UserError(f"{folder}: not a tokenizer minigpt can represent ({exc})") from None
    try:
        derived = derive_merges(tokens)
    except ValueError as exc:
        raise UserError(f"{folder}: {exc}") from None
    given = [(to_bytes(a, str(folder)), to_bytes(b, str(folder))) for a, b in merges]
    wanted = [(tokens[a], tokens[b]) for a, b in derived]
    if given != wanted:
        k = next((k for k, (g, w) in enumerate(zip(given, wanted, strict=False)) if g != w), None)
        if k is None:
            raise UserError(f"{folder}: {len(given)} merges for {len(wanted)} multi-byte tokens")
        raise UserError(f"{folder}: merge {k} ({merges[k][0]!r} + {merges[k][1]!r}) is not the pair that forms the "
                        f"next token from the tokens ranked below it: the merges must follow the ids for ranks and "
                        "merges to encode alike")
    return tok
