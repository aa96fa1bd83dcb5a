"""Hugging Face datasets as document streams that survive the network: `hf:NAME[:CONFIG[:SPLIT]]` sources.

    stream = HubStream("hf:HuggingFaceFW/fineweb-edu:sample-10BT", "text", Skipped(), cursor={})
    for doc in stream: ...          # documents, one per non-empty record
    stream.cursor                   # {"record": n, "state": ...}: start a later stream here to resume after doc n

Records are streamed with `datasets` (`pip install 'minigpt[hub]'`), so nothing is downloaded up front. After every
record the stream's position is taken with `IterableDataset.state_dict()` (a few microseconds); a network error
reopens the stream and `load_state_dict` continues at the next record, so nothing is lost or read twice.

Retries: a transient error (ConnectionError, a timeout, HTTP 429 or 5xx, an OSError from the network) is retried
after `wait * 2**(n - 1)` seconds (at most `MAX_WAIT`), times a random factor in [0.5, 1.5) so that many clients do
not retry in step. The count starts again once a record arrives; after `attempts` failures in a row the stream gives
up with `StreamFailed`, a one-line `UserError` (`minigpt prepare` adds that its finished shards are kept). Errors
that retrying cannot fix (no such dataset, a missing column, Hugging Face's offline mode) fail at once.
"""

from __future__ import annotations

import dataclasses
import errno
import random
import sys
import time
from collections.abc import Iterator
from typing import Any

from minigpt.common import UserError

MAX_WAIT = 120.0  # seconds: the longest pause between two attempts
INSTALL = "pip install 'minigpt[hub]'"
_NETWORK_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                   errno.ENETUNREACH, errno.ENETDOWN, errno.EPIPE, errno.EAGAIN}


class StreamFailed(UserError):
    """A hub stream that kept failing: the work done so far is valid and the same command continues it."""


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8  # failures in a row before giving up
    wait: float = 1.0  # seconds before the first retry; doubles after each failure


def parse(source: str) -> tuple[str, str | None, str]:
    """`hf:NAME[:CONFIG[:SPLIT]]` -> (name, config or None, split); the split defaults to train."""
    name, config, split = (source[3:].split(":") + ["", ""])[:3]
    if not name:
        raise UserError("a Hugging Face source looks like hf:NAME[:CONFIG[:SPLIT]], e.g. hf:roneneldan/TinyStories")
    return name, config or None, split or "train"


def require_datasets(source: str):
    try:
        import datasets
    except ImportError:
        raise UserError(f"{source} needs the Hugging Face `datasets` package: {INSTALL}") from None
    return datasets


def is_transient(exc: BaseException) -> bool:
    """Whether retrying may help: network trouble anywhere in the exception's chain, not a local or data error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if _transient_one(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _transient_one(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None) or getattr(exc, "status", None)
    if isinstance(status, int):
        return status == 429 or 500 <= status < 600
    # requests' ConnectionError/Timeout/ChunkedEncodingError, httpx's TransportError, aiohttp's ClientError and
    # fsspec's FSTimeoutError name themselves; matching names avoids importing three HTTP stacks.
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & {"Timeout", "ChunkedEncodingError", "TransportError", "TimeoutException", "ClientError",
                "ServerDisconnectedError", "FSTimeoutError", "IncompleteRead", "ProtocolError"}:
        return True
    if isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError,
                                                         NotADirectoryError)):
        return exc.errno is None or exc.errno in _NETWORK_ERRNOS  # a full disk or a missing file is not transient
    return False


def _offline() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _expected_records(ds, split: str) -> int | None:
    """The split's number of records when the dataset card states it (dataset info), else None; never fails."""
    try:
        info = ds.info.splits[split]
        return int(info.num_examples) or None
    except Exception:  # noqa: BLE001 - best effort: no ETA is the worst outcome
        return None


class HubStream:
    """The non-empty records of one `hf:` source as (text, source id) pairs, resumable from `cursor`, retrying the
    network (corpus.py makes them documents)."""

    def __init__(self, source: str, text_field: str, skipped, cursor: dict[str, Any],
                 retry: RetryPolicy | None = None, sleep=time.sleep) -> None:
        self.source, self.text_field, self.skipped = source, text_field, skipped
        self.name, self.config, self.split = parse(source)
        self.cursor = cursor  # updated in place: {"record": records consumed, "state": the stream's state_dict}
        self.retry = retry or RetryPolicy()
        self.expected_records: int | None = None
        self.retries = 0  # retries done, for reports
        self._sleep = sleep

    def __iter__(self) -> Iterator[tuple[str, str]]:
        datasets = require_datasets(self.source)
        failures = 0
        while True:
            try:
                stream = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
                if self.cursor.get("state") is not None:
                    stream.load_state_dict(self.cursor["state"])
                self.expected_records = self.expected_records or _expected_records(stream, self.split)
                for record in stream:
                    failures = 0
                    index = self.cursor.get("record", 0)
                    self.cursor["record"] = index + 1
                    self.cursor["state"] = stream.state_dict()  # resumes after this record
                    text = self._text(record)
                    if text is None:
                        self.skipped.empty += 1
                        continue
                    yield text, f"{self.source}:{index}"
                return
            except UserError:
                raise
            except Exception as exc:
                if not is_transient(exc) and not isinstance(exc, (OSError, ValueError)):
                    raise  # a bug, not the network or the dataset: keep the traceback
                if not is_transient(exc) or _offline():
                    raise UserError(f"cannot stream {self.source} (offline, or no such dataset?): "
                                    f"{_first_line(exc)}") from None
                failures += 1
                if failures >= self.retry.attempts:
                    raise StreamFailed(f"gave up on {self.source} after {failures} failed attempts in a row "
                                       f"({_first_line(exc)})") from None
                wait = min(MAX_WAIT, self.retry.wait * 2 ** (failures - 1)) * random.uniform(0.5, 1.5)
                where = f"record {self.cursor.get('record', 0):,}"
                _note(f"{self.source}: {_first_line(exc)} at {where}; retrying in {wait:.1f} s "
                      f"(attempt {failures + 1} of {self.retry.attempts})")
                self.retries += 1
                self._sleep(wait)

    def _text(self, record: dict[str, Any]) -> str | None:
        if self.text_field not in record:
            raise UserError(f"{self.source} has no field {self.text_field!r} (it has: {', '.join(record)}); "
                            f"choose one with --text-field")
        text = record[self.text_field]
        if text is None or not str(text).strip():
            return None
        return str(text)


def _note(message: str) -> None:
    """A line on stderr that leaves a progress bar intact."""
    try:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
    except ImportError:
        print(message, file=sys.stderr)

