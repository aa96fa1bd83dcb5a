"""Hugging Face datasets as document streams that survive the network: `hf:NAME[:CONFIG[:SPLIT]]` sources.

    stream = HubStream("hf:HuggingFaceFW/fineweb-edu:sample-10BT", "text", Skipped(), cursor={})
    for doc in stream: ...          # documents, one per non-empty record
    stream.cursor                   # {"record": n, "state": ...}: start a later stream here to resume after doc n

Records are streamed with `datasets` (`pip install 'minigpt[hub]'`), so nothing is downloaded up front. After every
record the stream's position is taken with `IterableDataset.state_dict()` (a few microseconds); a network error
reopens the stream and `load_state_dict` continues at the next record, so nothing is lost or read twice.

Retries: a transient error (ConnectionError, a timeout, HTTP 429 or 5xx, an OSError from the network) is retried
after `wait * 2**(n - 1)` seconds (at most `MAX_WAIT`), times a random factor in [0.5, 1.5) so that many clients do
not retry in step. The count starts again once a record arrives. The stream gives up with `StreamFailed`, a one-line
`UserError` (`minigpt prepare` adds that its finished shards are kept), after `attempts` failures in a row OR
`patience` seconds without a record, whichever comes first. The time bound matters because `datasets` and
`huggingface_hub` retry inside each of our attempts (5 and up to 20 times, waits of up to a minute): counting
attempts alone let one `prepare` retry for far longer than `--retries` said. The bound is kept by a SIGALRM timer
armed only while we wait for the hub (main thread only), so it interrupts their sleeps too.

Errors that retrying cannot fix fail at once: no such dataset, a missing column, Hugging Face's offline mode, and a
hub host name that does not resolve (checked before each attempt, skipped behind an HTTP(S) proxy, which resolves
names itself).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib.util
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from minigpt.common import UserError

MAX_WAIT = 120.0  # seconds: the longest pause between two attempts
RESOLVE_TIMEOUT = 15.0  # seconds for the hub's host name to resolve before we call it unresolvable
INSTALL = "pip install 'minigpt[hub]'"
_NETWORK_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                   errno.ENETUNREACH, errno.ENETDOWN, errno.EPIPE, errno.EAGAIN}


class StreamFailed(UserError):
    """A hub stream that kept failing: the work done so far is valid and the same command continues it."""


class _Stalled(BaseException):
    """Raised by the patience timer: a BaseException, so the retry loops inside `datasets` do not swallow it."""


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8  # failures in a row before giving up
    wait: float = 1.0  # seconds before the first retry; doubles after each failure
    patience: float = 600.0  # seconds without a record before giving up, inner libraries' retries included


def parse(source: str) -> tuple[str, str | None, str]:
    """`hf:NAME[:CONFIG[:SPLIT]]` -> (name, config or None, split); the split defaults to train."""
    name, config, split = (source[3:].split(":") + ["", ""])[:3]
    if not name:
        raise UserError("a Hugging Face source looks like hf:NAME[:CONFIG[:SPLIT]], e.g. hf:roneneldan/TinyStories")
    return name, config or None, split or "train"


def check_source(source: str) -> None:
    """Fail early, before any work, when an `hf:` source cannot be read: a malformed name, no `datasets` package
    (checked without importing it). Corpora and conversations alike."""
    parse(source)
    if importlib.util.find_spec("datasets") is None:
        raise UserError(f"{source} needs the Hugging Face `datasets` package: {INSTALL}")


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
    network (corpus.py makes them documents); with text_field None, every record whole (for conversations)."""

    def __init__(self, source: str, text_field: str | None, skipped, cursor: dict[str, Any],
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
        last_record = time.monotonic()  # the patience clock: restarted by every record
        while True:
            try:
                check_hub_resolves(self.source)
                with _deadline(last_record + self.retry.patience):
                    stream = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
                    if self.cursor.get("state") is not None:
                        stream.load_state_dict(self.cursor["state"])
                    self.expected_records = self.expected_records or _expected_records(stream, self.split)
                    records = iter(stream)
                while True:
                    with _deadline(last_record + self.retry.patience):
                        record = next(records, None)
                    if record is None:
                        return
                    failures, last_record = 0, time.monotonic()
                    index = self.cursor.get("record", 0)
                    self.cursor["record"] = index + 1
                    self.cursor["state"] = stream.state_dict()  # resumes after this record
                    if self.text_field is None:  # whole records (conversations.py reads their messages)
                        yield record, f"{self.source}:{index}"
                        continue
                    text = self._text(record)
                    if text is None:
                        self.skipped.empty += 1
                        continue
                    yield text, f"{self.source}:{index}"
            except UserError:
                raise
            except _Stalled:
                raise self._gave_up(f"no record for {self.retry.patience:g} s", None) from None
            except Exception as exc:
                if not is_transient(exc) and not isinstance(exc, (OSError, ValueError)):
                    raise  # a bug, not the network or the dataset: keep the traceback
                if not is_transient(exc) or _offline():
                    raise UserError(f"cannot stream {self.source} (offline, or no such dataset?): "
                                    f"{_first_line(exc)}") from None
                failures += 1
                left = last_record + self.retry.patience - time.monotonic()
                if failures >= self.retry.attempts or left <= 0:
                    raise self._gave_up(f"{failures} failed attempts in a row", exc) from None
                wait = min(MAX_WAIT, self.retry.wait * 2 ** (failures - 1)) * random.uniform(0.5, 1.5)
                wait = min(wait, left)
                where = f"record {self.cursor.get('record', 0):,}"
                _note(f"{self.source}: {_first_line(exc)} at {where}; retrying in {wait:.1f} s "
                      f"(attempt {failures + 1} of {self.retry.attempts}, giving up after "
                      f"{self.retry.patience:g} s without a record)")
                self.retries += 1
                self._sleep(wait)

    def _gave_up(self, why: str, exc: BaseException | None) -> StreamFailed:
        cause = f" ({_first_line(exc)})" if exc is not None else ""
        return StreamFailed(f"could not reach {self.source} at {hub_host() or 'the Hugging Face hub'}: gave up after "
                            f"{why}{cause}")

    def _text(self, record: dict[str, Any]) -> str | None:
        if self.text_field not in record:
            raise UserError(f"{self.source} has no field {self.text_field!r} (it has: {', '.join(record)}); "
                            f"choose one with --text-field")
        text = record[self.text_field]
        if text is None or not str(text).strip():
            return None
        return str(text)


def hub_host() -> str | None:
    """The host name of the hub's endpoint (HF_ENDPOINT or huggingface.co); None without huggingface_hub."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    return urlsplit(constants.ENDPOINT).hostname


def _behind_proxy() -> bool:
    return any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                                                 "ALL_PROXY", "all_proxy"))


def check_hub_resolves(source: str) -> None:
    """A UserError at once when the hub's host name does not resolve: no network, or a mistyped HF_ENDPOINT. A
    dropped connection is worth retrying; a name that does not resolve fails the same way every retry (and
    `huggingface_hub` alone spends 23 s retrying it). Behind a proxy the proxy resolves names, so we do not."""
    host = hub_host()
    if host is None or _behind_proxy() or _offline():  # offline mode reads the local cache: no name to look up
        return
    outcome: list[BaseException | None] = []

    def resolve() -> None:
        try:
            socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    # getaddrinfo cannot be interrupted; a thread bounds the wait when no DNS server answers.
    thread = threading.Thread(target=resolve, daemon=True)
    thread.start()
    thread.join(RESOLVE_TIMEOUT)
    if outcome and outcome[0] is None:
        return
    why = f"{outcome[0]}" if outcome else f"no answer in {RESOLVE_TIMEOUT:g} s"
    raise StreamFailed(f"could not reach {source}: the hub's host {host} does not resolve ({why}); check the network "
                       f"(or HF_ENDPOINT)")


@contextlib.contextmanager
def _deadline(at: float) -> Iterator[None]:
    """Raise _Stalled in the main thread once time.monotonic() passes `at` (no timer elsewhere: signals are the main
    thread's)."""
    left = at - time.monotonic()
    if left <= 0:
        raise _Stalled
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def fire(signum, frame):
        raise _Stalled

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, left)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _note(message: str) -> None:
    """A line on stderr that leaves a progress bar intact."""
    try:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
    except ImportError:
        print(message, file=sys.stderr)

