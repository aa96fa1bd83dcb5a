"""Load test for `minigpt serve`: continuous batching against one-request-at-a-time serving, then abuse.

    python bench/serve_load.py                                   # random mini-shape model, 64 streaming clients
    python bench/serve_load.py --clients 16 --duration 10 --preset tiny
    python bench/serve_load.py --url http://127.0.0.1:8000 --model NAME   # a server you started yourself

Without --url, a run with random weights is written to a temporary folder and served by `minigpt serve` in a
separate process: the --preset shape over the first --vocab ids of GPT-2's vocabulary (BPE ranks are merge order,
so any prefix of them is a working tokenizer; 8192 is the size minigpt's own presets train). Trained weights
would not change the speed. Every request is a streamed completion of exactly --max-tokens tokens (end-of-text
is forbidden through logit_bias), so the phases compare like with like:

    sequential   one client sends the requests one after another for --duration seconds
    concurrent   --clients clients each send their next request as soon as the last one ends, for --duration
    chaos        normal clients, clients that hang up mid-stream and malformed requests, mixed, for --duration

After the chaos, /health must say "ok" with no running and no waiting sequences (no leaked rows), and one more
request must succeed. The table gives generated tokens per second, time to first token (request sent -> first
text received) and errors: any transport failure, 5xx, missing [DONE], or wrong token count for a good request,
and any status but 4xx for a malformed one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPTS = ["The history of the city begins", "In the morning the river", "Scientists have long wondered why",
           "The old library on the hill", "A recipe for bread needs", "The football season opened with",
           "During the war the village", "The first computers were"]


@dataclass
class Phase:
    name: str
    clients: int
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    notes: dict[str, int] = field(default_factory=dict)

    def note(self, key: str) -> None:
        self.notes[key] = self.notes.get(key, 0) + 1


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def stream_one(client: httpx.AsyncClient, url: str, body: dict, phase: Phase, hang_up_after: int = 0) -> None:
    """One streamed completion; with hang_up_after > 0, close the connection after that many chunks."""
    start = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                phase.errors.append(f"HTTP {response.status_code}: {response.text[:100]}")
                return
            first, usage, done, chunks = None, None, False, 0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    phase.errors.append(f"stream error: {event['error']['message'][:100]}")
                    return
                if event["choices"] and event["choices"][0]["text"] and first is None:
                    first = time.perf_counter() - start
                if event.get("usage"):
                    usage = event["usage"]["completion_tokens"]
                chunks += 1
                if hang_up_after and chunks >= hang_up_after:
                    phase.note("hung up mid-stream")
                    return  # leaving the block closes the connection with the response unread
    except httpx.HTTPError as exc:
        phase.errors.append(f"{type(exc).__name__}: {exc}")
        return
    phase.requests += 1
    if not done or usage != body["max_tokens"] or first is None:
        phase.errors.append(f"incomplete stream (done={done}, tokens={usage})")
        return
    phase.tokens += usage
    phase.ttft.append(first)


MALFORMED = [
    ("invalid JSON", b'{"prompt": "x", ', {}),
    ("wrong type", {"prompt": "x", "temperature": "hot"}, {}),
    ("unknown model", {"model": "no-such-model", "prompt": "x"}, {}),
    ("prompt too long", {"prompt": "word " * 5000}, {}),
    ("n too large", {"prompt": "x", "n": 1000}, {}),
    ("negative max_tokens", {"prompt": "x", "max_tokens": -5}, {}),
    ("not an object", [1, 2, 3], {}),
    ("body too large", {"prompt": "x" * (3 << 20)}, {}),
    ("bad logit_bias", {"prompt": "x", "logit_bias": {"token": 5}}, {}),
]


async def malformed_one(client: httpx.AsyncClient, url: str, model: str, phase: Phase) -> None:
    name, body, _ = random.choice(MALFORMED)
    if isinstance(body, dict) and "model" not in body:
        body = {"model": model, **body}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        response = await client.post(url + "/v1/completions", content=content,
                                     headers={"Content-Type": "application/json"})
    except httpx.HTTPError as exc:
        phase.errors.append(f"{name}: {type(exc).__name__}")
        return
    try:
        shaped = "error" in response.json()
    except ValueError:  # not JSON: an error too, counted rather than crashing the benchmark
        shaped = False
    if not 400 <= response.status_code < 500 or not shaped:
        phase.errors.append(f"{name}: HTTP {response.status_code}" + ("" if shaped else " without an error body"))
    else:
        phase.note(f"malformed -> {response.status_code}")


def request_body(model: str, max_tokens: int, eot: int, rng: random.Random) -> dict:
    return {"model": model, "prompt": rng.choice(PROMPTS), "max_tokens": max_tokens, "temperature": 0.8,
            "stream": True, "stream_options": {"include_usage": True}, "logit_bias": {str(eot): -100}}


async def run_phase(name: str, url: str, model: str, eot: int, clients: int, duration: float, max_tokens: int,
                    chaos: bool = False) -> Phase:
    phase = Phase(name, clients)
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    timeout = httpx.Timeout(120.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=_auth()) as client:
        start = time.perf_counter()
        stop_at = start + duration

        async def worker(i: int) -> None:
            rng = random.Random(i)
            while time.perf_counter() < stop_at:
                role = i % 4 if chaos else 0  # chaos: half normal, a quarter hang up, a quarter malformed
                if role == 2:
                    await stream_one(client, url, request_body(model, max_tokens, eot, rng), phase,
                                     hang_up_after=rng.randint(1, 5))
                elif role == 3:
                    await malformed_one(client, url, model, phase)
                    await asyncio.sleep(rng.uniform(0.0, 0.2))
                else:
                    await stream_one(client, url, request_body(model, max_tokens, eot, rng), phase)

        await asyncio.gather(*(worker(i) for i in range(clients)))
        phase.elapsed = time.perf_counter() - start
    return phase


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, folder: Path) -> tuple[subprocess.Popen, str, str]:
    """Write a random-weight run and serve it with `minigpt serve` in another process."""
    import torch

    from minigpt.model.gpt import GPT, ModelConfig
    from minigpt.runs.checkpoint import save_checkpoint
    from minigpt.text.tokenizer import DEFAULT_SPECIALS, Tokenizer

    gpt2 = Tokenizer.gpt2()
    ranks = min(args.vocab - len(DEFAULT_SPECIALS), gpt2.eot_id)
    tokenizer = Tokenizer([gpt2.token_bytes(i) for i in range(ranks)],
                          {name: ranks + i for i, name in enumerate(DEFAULT_SPECIALS)}, gpt2.pattern,
                          name=f"gpt2-first-{ranks}", pattern_name="gpt2")
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset(args.preset, vocab_size=tokenizer.n_vocab))
    run = folder / f"random-{args.preset}"
    tokenizer.save(run / "tokenizer.json")
    save_checkpoint(run, model, step=0, meta={"tokenizer_hash": tokenizer.hash})
    print(f"model: {args.preset} shape, {tokenizer.n_vocab} tokens, {model.num_params() / 1e6:.1f}M parameters, "
          "random weights", flush=True)
    port = free_port()
    command = [sys.executable, "-m", "minigpt", "serve", "--model", str(run), "--port", str(port),
               "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue), "--threads", str(args.threads),
               "--log-level", "warning"]
    proc = subprocess.Popen(command, stdout=sys.stderr, stderr=sys.stderr)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url, run.name
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the server did not start")
        time.sleep(0.3)


def settle(url: str, limit: float = 10.0) -> dict:
    """/health once nothing runs or waits (or after `limit` seconds)."""
    deadline = time.monotonic() + limit
    while True:
        health = httpx.get(url + "/health").json()
        if (health["running"] == 0 and health["queued"] == 0) or time.monotonic() > deadline:
            return health
        time.sleep(0.1)


def table(phases: list[Phase]) -> str:
    rows = [("phase", "clients", "requests", "errors", "tokens", "seconds", "tokens/s", "TTFT p50", "TTFT p95")]
    for p in phases:
        rows.append((p.name, str(p.clients), str(p.requests), str(len(p.errors)), str(p.tokens), f"{p.elapsed:.1f}",
                     f"{p.tokens / p.elapsed:.0f}", f"{percentile(p.ttft, 0.5) * 1000:.0f} ms",
                     f"{percentile(p.ttft, 0.95) * 1000:.0f} ms"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an already running server (default: start one)")
    parser.add_argument("--model", help="its model name (with --url)")
    parser.add_argument("--preset", default="mini", help="model shape of the started server (default: mini)")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary of the started server (default: 8192)")
    parser.add_argument("--max-batch", type=int, default=64, help="the started server's --max-batch (default: 64)")
    parser.add_argument("--threads", type=int, default=0, help="the started server's --threads (default: 0)")
    parser.add_argument("--max-queue", type=int, default=64, help="the started server's --max-queue (default: 64)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (default: 64)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per phase (default: 20)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default: 32)")
    parser.add_argument("--skip-sequential", action="store_true", help="leave out the one-at-a-time phase")
    args = parser.parse_args()

    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            url, model = args.url.rstrip("/"), args.model
            if not model:
                model = httpx.get(url + "/v1/models", headers=_auth()).json()["data"][0]["id"]
        else:
            proc, url, model = start_server(args, Path(tmp))
        try:
            eot = httpx.get(url + "/tokenizer_info", headers=_auth()).json()["special_tokens"]["<|endoftext|>"]
            print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
            phases = []
            if not args.skip_sequential:
                phases.append(asyncio.run(run_phase("sequential", url, model, eot, 1, args.duration,
                                                    args.max_tokens)))
            phases.append(asyncio.run(run_phase("concurrent", url, model, eot, args.clients, args.duration,
                                                args.max_tokens)))
            phases.append(asyncio.run(run_phase("chaos", url, model, eot, args.clients, args.duration,
                                                args.max_tokens, chaos=True)))
            health = settle(url)
            final = Phase("final check", 1)
            asyncio.run(stream_one(httpx.AsyncClient(timeout=60, headers=_auth()), url,
                                   request_body(model, args.max_tokens, eot, random.Random(0)), final))
            metrics = httpx.get(url + "/metrics", headers=_auth()).text
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(10)

    print()
    print(table(phases))
    if not args.skip_sequential:
        rate = [p.tokens / p.elapsed for p in phases[:2]]
        print(f"\nspeed-up, concurrent over sequential: {rate[1] / rate[0]:.1f}x")
    print(f"chaos: {dict(sorted(phases[-1].notes.items()))}")
    print(f"after chaos: /health {health['status']}, running {health['running']}, queued {health['queued']}; "
          f"final request {'ok' if final.requests == 1 and not final.errors else 'FAILED'}")
    rejected = next((line.split()[-1] for line in metrics.splitlines() if line.startswith("minigpt_rejected_total")),
                    "?")
    print(f"server: 429 answers {rejected}")
    for p in phases:
        for error in sorted(set(p.errors))[:5]:
            print(f"  {p.name} error: {error}")
    leaked = health["running"] or health["queued"] or health["status"] != "ok"
    if any(p.errors for p in phases) or leaked or final.errors:
        raise SystemExit(1)


def _auth() -> dict[str, str]:
    key = os.environ.get("MINIGPT_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


if __name__ == "__main__":
    main()
