"""Conversations for chat fine-tuning: bundled sets, your files and Hugging Face datasets, in the common shapes.

    iter_records("chats.jsonl", skipped)            raw records, streamed (one at a time, never a whole file)
    to_messages(record, FieldMap())                 one record -> [Message, ...], or the reason it is left out
    load_conversations(["chatterbot", "x.json"])    small sets in memory, for scripts and tests

Sources (`minigpt sft --datasets ...`; docs/sft.md has examples):
    chatterbot, wiki-qa                     bundled (see BUNDLED; bundled.py reads them)
    chats.jsonl, chats.json, chats.parquet  files; a folder or a glob means every such file in it, sorted
    hf:NAME[:CONFIG[:SPLIT]]                a Hugging Face dataset, streamed with `datasets` (SPLIT defaults to train)
    SOURCE*3, SOURCE*0.5                    a mixture weight: every conversation 3 times per epoch; a seeded half
                                            of them, drawn afresh each epoch (nanochat repeats its small sets so)

Record shapes, detected per record:
    OpenAI    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
    ShareGPT  {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}
    Alpaca    {"instruction": ..., "input": ..., "output": ..., "system": ...}  (input and system optional)
Other names come in through a field map (`--fields`, see FieldMap): `prompt=question response=answer` reads
{"question", "answer"} records; `messages=dialog role=speaker content=text bot=assistant` reads
{"dialog": [{"speaker": "bot", "text": ...}]}.

What is kept, what is left out (and counted by reason: SKIP_REASONS), never silently changed:
- System prompts and multi-turn conversations are kept as they are; `developer` is a system message. Trailing
  messages after the last assistant message teach nothing and are dropped.
- `content` as a list of parts (OpenAI's [{"type": "text", "text": ...}]) is the text parts joined by newlines, as
  `minigpt serve` reads it; a part that is not text (an image, audio) leaves the record out (`non_text`).
- `content: null` leaves the record out (`null_content`): there is no text to train on, and "None" is not one.
- Tool use (a `tool` or `function` message, or an assistant message with `tool_calls`/`function_call`) leaves the
  record out (`tool`): minigpt's chat format has no tool turns, and a flattened copy would teach a format that no
  server renders.
- A record with no assistant text (`no_answer`), an unknown role or a message that is not role + text
  (`bad_message`), or no known shape at all (`not_a_conversation`) is left out.
- Bytes that are not UTF-8, in a JSON line, a record or a whole file (`non_utf8`), JSON that does not parse
  (`invalid_json`: a bad line, or the rest of a .json file from the first error), binary files (`binary`) and
  files that cannot be read (`unreadable`, e.g. a damaged Parquet file) are counted, never fatal.
A source in which nothing at all is usable stops with one line saying why (e.g. its records' fields).
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from minigpt.common import UserError, is_held_out
from minigpt.text import hub, sources
from minigpt.text.bundled import check_installed, package_version, read_conversations
from minigpt.text.chat_format import Conversation, Message

# How a conversation's split reads its key's digest (common.is_held_out): big-endian, as since the first release, so
# every held-out set made so far stays the same.
SPLIT_BYTEORDER = "big"

BUNDLED = {
    "chatterbot": "chatterbot-corpus: about 2,000 short English dialogues on 20 topics",
    "wiki-qa": "questions about the bundled Wikipedia summaries, answered with each article's opening",
    "wiki-qa-short": "a second question about each article, asked another way and answered in a few words from its "
                     "description (\"Tomato: Edible berry.\"); held out with wiki-qa by article",
}
SUFFIXES = (".jsonl", ".json", ".parquet")
SNIFF_BYTES = 8192  # a NUL byte in this much of a JSON file marks it binary
SKIP_REASONS = {
    "not_a_conversation": "records in no known shape (see --fields)",
    "tool": "records with tool or function calls (the chat format has no tool turns)",
    "null_content": "records with a message whose content is null",
    "non_text": "records with content parts that are not text (images, audio)",
    "bad_message": "records with a message that is not a known role with text",
    "no_answer": "records without assistant text",
    "non_utf8": "lines, records or files that are not UTF-8",
    "invalid_json": "lines that are not JSON, or the rest of a .json file from its first error",
    "binary": "binary files",
    "unreadable": "files that could not be read",
}
# Speaker names of the common formats -> our roles ("tool" marks tool use: such records are left out).
ROLE_NAMES = {"user": "user", "human": "user", "prompter": "user", "assistant": "assistant", "gpt": "assistant",
              "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
              "bot": "assistant", "system": "system", "developer": "system", "tool": "tool", "function": "tool",
              "ipython": "tool", "observation": "tool"}
_SURROGATE = re.compile("[\ud800-\udfff]")  # what undecodable bytes (surrogateescape) and bad escapes leave behind


# ----------------------------------------------------------------------------------------------------------------
# Source specs and field maps


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    source: str  # as given, without its weight
    weight: float = 1.0  # copies per epoch: 3 = three times, 0.5 = a seeded half


def parse_source(spec: str) -> SourceSpec:
    """`SOURCE` or `SOURCE*WEIGHT`. A glob keeps its stars: only a number after the last `*` is a weight."""
    head, star, tail = spec.rpartition("*")
    if star and head:
        try:
            weight = float(tail)
        except ValueError:
            return SourceSpec(spec)
        if not 0 < weight < 1e6:
            raise UserError(f"{spec}: the weight after * must be a positive number (3 repeats, 0.5 halves)")
        return SourceSpec(head, weight)
    return SourceSpec(spec)


FIELD_KEYS = ("messages", "role", "content", "prompt", "input", "response", "system")


@dataclasses.dataclass(frozen=True)
class FieldMap:
    """Where a record keeps its conversation; `parse` adds the names given with --fields in front of the defaults.

    Keys: messages (the list of messages), role and content (inside each message), and for one-turn records
    prompt, input (appended to the prompt after a blank line), response and system. Any other key names a
    speaker: `bot=assistant` reads messages from "bot" as the assistant's.
    """

    messages: tuple[str, ...] = ("messages", "conversations")
    role: tuple[str, ...] = ("role", "from")
    content: tuple[str, ...] = ("content", "value")
    prompt: tuple[str, ...] = ("instruction",)
    input: tuple[str, ...] = ("input",)
    response: tuple[str, ...] = ("output",)
    system: tuple[str, ...] = ("system",)
    speakers: tuple[tuple[str, str], ...] = ()  # extra speaker name -> role

    @classmethod
    def parse(cls, entries: Sequence[str]) -> FieldMap:
        fields = cls()
        speakers = dict(fields.speakers)
        for entry in entries:
            key, eq, name = (part.strip() for part in entry.partition("="))
            if not eq or not key or not name:
                raise UserError(f"--fields takes KEY=NAME entries (keys: {', '.join(FIELD_KEYS)}, or a speaker "
                                f"name =user/assistant/system), not {entry!r}")
            if key in FIELD_KEYS:
                fields = dataclasses.replace(fields, **{key: (name, *getattr(fields, key))})
            elif name in ("user", "assistant", "system"):
                speakers[key.lower()] = name
            else:
                raise UserError(f"--fields {entry}: {key} is not one of {', '.join(FIELD_KEYS)}, and a speaker "
                                f"name maps to user, assistant or system")
        return dataclasses.replace(fields, speakers=tuple(sorted(speakers.items())))

    def names(self) -> set[str]:
        """Every top-level field a record may be read from (Parquet reads only these columns)."""
        return {*self.messages, *self.prompt, *self.input, *self.response, *self.system}


def _first(record: dict, names: tuple[str, ...]) -> tuple[bool, Any]:
    for name in names:
        if name in record:
            return True, record[name]
    return False, None


# ----------------------------------------------------------------------------------------------------------------
# One record -> messages


def message_text(content: Any) -> str | None:
    """A message's text: a string, or a list of text parts joined by newlines. None when there is no text form
    (null, a non-text part, another type); `content_problem` says which."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    return None


def content_problem(content: Any) -> str:
    if content is None:
        return "null_content"
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return "non_text"
    return "bad_message"


def to_messages(record: Any, fields: FieldMap) -> list[Message] | str:
    """A record's messages, or the reason (a SKIP_REASONS key) it is left out."""
    if not isinstance(record, dict):
        return "not_a_conversation"
    found, turns = _first(record, fields.messages)
    if found:
        messages = _from_turns(turns, fields)
    else:
        messages = _from_single_turn(record, fields)
    if isinstance(messages, str):
        return messages
    while messages and messages[-1].role != "assistant":
        messages.pop()
    if not any(m.role == "assistant" and m.content.strip() for m in messages):
        return "no_answer"
    if any(_SURROGATE.search(m.content) for m in messages):
        return "non_utf8"
    return messages


def _from_turns(turns: Any, fields: FieldMap) -> list[Message] | str:
    if not isinstance(turns, list):
        return "bad_message"
    speakers = dict(fields.speakers)
    out = []
    for turn in turns:
        if not isinstance(turn, dict):
            return "bad_message"
        if turn.get("tool_calls") or turn.get("function_call"):
            return "tool"
        _, speaker = _first(turn, fields.role)
        role = speakers.get(str(speaker).lower()) or ROLE_NAMES.get(str(speaker).lower())
        if role is None:
            return "bad_message"
        if role == "tool":
            return "tool"
        _, content = _first(turn, fields.content)
        text = message_text(content)
        if text is None:
            return content_problem(content)
        out.append(Message(role, text))
    return out


def _from_single_turn(record: dict, fields: FieldMap) -> list[Message] | str:
    has_prompt, prompt = _first(record, fields.prompt)
    has_response, response = _first(record, fields.response)
    if not (has_prompt and has_response):
        return "not_a_conversation"
    _, extra = _first(record, fields.input)
    _, system = _first(record, fields.system)
    parts = [message_text(v) if v is not None else "" for v in (prompt, extra, response, system)]
    if prompt is None or response is None:
        return "null_content"
    if any(p is None for p in parts):
        return "bad_message"
    prompt_text, extra_text, response_text, system_text = parts
    if extra_text.strip():
        prompt_text = f"{prompt_text.strip()}\n\n{extra_text.strip()}"
    messages = [Message("system", system_text)] if system_text.strip() else []
    return [*messages, Message("user", prompt_text), Message("assistant", response_text)]


# ----------------------------------------------------------------------------------------------------------------
# Files


Record = tuple[str, Any, int]  # (key, record: a dict, or a raw JSON line as bytes, parsed later), input bytes


def _read_jsonl(path: Path, source_id: str, skipped: Counter) -> Iterator[Record]:
    """Raw lines, numbered from 1: workers decode and parse them (the main process only splits the file)."""
    with open(path, "rb") as f:
        if b"\0" in f.read(SNIFF_BYTES):
            skipped["binary"] += 1
            return
        f.seek(0)
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield f"{source_id}:{lineno}", raw, len(raw)


def parse_line(raw: bytes) -> tuple[Any, str | None]:
    """A JSON line -> (its record, None), or (None, the skip reason: non_utf8 or invalid_json)."""
    try:
        return json.loads(raw.decode("utf-8")), None
    except UnicodeDecodeError:
        return None, "non_utf8"
    except json.JSONDecodeError:
        return None, "invalid_json"


def record_messages(record: Any, fields: FieldMap) -> list[Message] | str:
    """`to_messages` of a record as `iter_records` yields it (a raw JSON line is parsed first)."""
    if isinstance(record, bytes):
        record, reason = parse_line(record)
        if reason is not None:
            return reason
    return to_messages(record, fields)


_JSON = json.JSONDecoder()
_BLOCK = 1 << 20
_MAX_RECORD = 64 << 20  # a "record" this long without parsing is a broken file, not a long conversation


def _read_json(path: Path, source_id: str, skipped: Counter) -> Iterator[Record]:
    """A .json file record by record, never whole: a list of records (ShareGPT dumps are 100s of MB), or records
    one after another (JSON Lines named .json). A broken or cut-off file keeps the records before the break."""
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
        if b"\0" in head:
            skipped["binary"] += 1
            return
        # surrogateescape: bad bytes become lone surrogates, found per record (to_messages), not fatal per file
        decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        buf, pos, eof, index = decoder.decode(head).removeprefix("\ufeff"), 0, False, 0
        opened = False  # the list's "[" seen
        while True:
            while True:  # skip what lies between records: whitespace, commas, the list's opening bracket
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    pos += 1
                if pos < len(buf) and buf[pos] == "[" and not opened and index == 0:
                    pos, opened = pos + 1, True
                    continue
                if pos < len(buf) or eof:
                    break
                block = f.read(_BLOCK)
                eof = not block
                buf, pos = buf[pos:] + decoder.decode(block, final=eof), 0
            if pos >= len(buf) or buf[pos] == "]":
                return
            try:
                record, end = _JSON.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof or len(buf) - pos > _MAX_RECORD:
                    skipped["invalid_json"] += 1
                    return
                block = f.read(_BLOCK)
                eof = not block
                buf, pos = buf[pos:] + decoder.decode(block, final=eof), 0
                continue
            yield f"{source_id}:{index}", record, end - pos
            index += 1
            pos = end


def _read_parquet(path: Path, source_id: str, fields: FieldMap, skipped: Counter) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
        wanted = [name for name in pf.schema_arrow.names if name in fields.names()] or None
        rows = max(pf.metadata.num_rows, 1)
        per_row = path.stat().st_size / rows
        index = 0
        # batches of rows, one row group's worth of columns at most: memory stays flat whatever the file's size
        for batch in pf.iter_batches(batch_size=1000, columns=wanted):
            for record in batch.to_pylist():
                yield f"{source_id}:{index}", record, int(per_row)
                index += 1
    except UserError:
        raise
    except Exception:  # pyarrow raises many types for a damaged file: counted, the rest of this file skipped
        skipped["unreadable"] += 1


def source_files(source: str) -> list[tuple[Path, str]] | None:
    """(path, source id) of a file, folder or glob source; None when it names no path at all."""
    files = sources.source_files(source, SUFFIXES, ".jsonl, .json or .parquet")
    if files == [] and Path(source).is_dir():
        raise UserError(f"{source} holds no .jsonl, .json or .parquet files")
    return files


def _read_file(path: Path, source_id: str, fields: FieldMap, skipped: Counter) -> Iterator[Record]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _read_parquet(path, source_id, fields, skipped)
    elif suffix == ".json":
        yield from _read_json(path, source_id, skipped)
    else:  # .jsonl, and a file named directly whatever its suffix
        yield from _read_jsonl(path, source_id, skipped)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face datasets (optional, online)


def _read_hf(source: str) -> Iterator[Record]:
    """A hub dataset's records, streamed by hub.py: retried and resumed where the network drops, as pretraining's."""
    for record, key in hub.HubStream(source, None, None, cursor={}):
        yield key, record, 0


# ----------------------------------------------------------------------------------------------------------------
# Public entry points


def check_source(source: str) -> None:
    """Fail early, before any work, when a source cannot be read (missing path, missing package)."""
    if source in BUNDLED:
        check_installed(source)
    elif source.startswith("hf:"):
        hub.check_source(source)
    elif source_files(source) is None:
        raise UserError(f"no conversations at {source}: give a .jsonl, .json or .parquet file, a folder or glob of "
                        f"them, hf:NAME, or one of {', '.join(BUNDLED)}")


def iter_records(source: str, fields: FieldMap, skipped: Counter) -> Iterator[Record]:
    """Stream the raw records of one source (weights already parsed off), counting unreadable files in `skipped`."""
    check_source(source)
    if source in BUNDLED:
        for conv in read_conversations(source):
            yield conv.key, {"messages": [dataclasses.asdict(m) for m in conv.messages]}, 0
    elif source.startswith("hf:"):
        yield from _read_hf(source)
    else:
        for path, source_id in source_files(source) or []:
            yield from _read_file(path, source_id, fields, skipped)


def source_fingerprint(source: str) -> Any:
    """What decides whether prepared data for `source` is still current: each file's path, size and time; a
    bundled set's package version; a hub dataset's name (a moving hub dataset needs --sft-cache cleared)."""
    if source in BUNDLED:
        return [source, package_version(source)]
    if source.startswith("hf:"):
        return [source]
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p, _ in source_files(source) or []]


def source_size(source: str) -> int | None:
    """Bytes on disk of a file source (for progress bars); None for bundled and hub sources."""
    if source in BUNDLED or source.startswith("hf:"):
        return None
    return sum(p.stat().st_size for p, _ in source_files(source) or [])


def load_conversations(sources: Sequence[str], fields: FieldMap | None = None,
                       skipped: Counter | None = None) -> list[Conversation]:
    """Every usable conversation of `sources` in memory (weights ignored): for small sets, scripts and tests.
    Training streams instead (data/sft_data.py)."""
    fields = fields or FieldMap()
    skipped = Counter() if skipped is None else skipped
    out: list[Conversation] = []
    for spec in sources:
        source = parse_source(spec).source
        if source in BUNDLED:
            out += read_conversations(source)
            continue
        for key, record, _ in iter_records(source, fields, skipped):
            messages = record_messages(record, fields)
            if isinstance(messages, str):
                skipped[messages] += 1
            else:
                out.append(Conversation(key, messages))
    if not out:
        raise UserError(f"no usable conversations in {', '.join(sources)} ({describe_skipped(skipped) or 'empty'})")
    return out


def split_conversations(convs: list[Conversation], fraction: float, seed: int = 0
                        ) -> tuple[list[Conversation], list[Conversation]]:
    train, held = [], []
    for c in convs:
        (held if is_held_out(c.key, fraction, seed, SPLIT_BYTEORDER) else train).append(c)
    return train, held


def describe_skipped(skipped: Counter | dict[str, int]) -> str:
    """'3 records with a message whose content is null, 1 binary file...' in one line ('' when nothing was)."""
    return "; ".join(f"{n:,} {SKIP_REASONS.get(reason, reason)}" for reason, n in sorted(skipped.items()) if n)
