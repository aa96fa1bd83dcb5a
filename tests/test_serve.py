"""`minigpt serve` through real clients on loopback: the official `openai` client, raw HTTP and lm-evaluation-harness.

Two servers run on threads for the whole module: the `chat_run` model behind an API key, and a random model with
a long context window (slow enough to be interrupted) with one row and a one-request queue, for disconnects,
429s and time limits. Answers are checked against the engine and the model used directly.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from minigpt.chat.engine import Engine, SamplingParams  # noqa: E402
from minigpt.model.gpt import GPT, ModelConfig  # noqa: E402
from minigpt.runs.loading import load_run  # noqa: E402
from minigpt.serve.serve import BackgroundServer, ServeConfig, create_app  # noqa: E402
from minigpt.text.chat_format import end_of_turn_ids, render, stop_ids  # noqa: E402
from minigpt.text.tokenizer import Tokenizer  # noqa: E402

KEY = "test-key"


@pytest.fixture(scope="module")
def chat(chat_run):
    """(server, model, tokenizer) for the chat model, API key required."""
    model, tokenizer, _ = load_run(chat_run)
    app = create_app(model, tokenizer, ServeConfig(model=str(chat_run), max_batch=4, api_key=KEY), "chat")
    with BackgroundServer(app) as server:
        yield server, model, tokenizer


def slow_model(tokenizer) -> GPT:
    """Random weights, a 1024-token window, eight layers: a 1000-token reply takes about 7 s on a 2-core CPU."""
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=8, n_head=4, n_embd=256, block_size=1024, vocab_size=tokenizer.n_vocab)).eval()


@pytest.fixture(scope="module")
def slow(tiny_shards):
    """(server, tokenizer) for `slow_model`: one row, one waiting request at most."""
    tokenizer = Tokenizer.load(tiny_shards / "tokenizer.json")
    app = create_app(slow_model(tokenizer), tokenizer, ServeConfig(model="slow", max_batch=1, max_queue=1), "slow")
    with BackgroundServer(app) as server:
        yield server, tokenizer


@pytest.fixture
def client(chat):
    return openai.OpenAI(base_url=chat[0].url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy_offline(model, prompt: list[int], stop: list[int], max_new_tokens: int) -> list[int]:
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, stop_token_ids=stop)
    return Engine(model, max_batch=1).generate([prompt], params)[0].tokens


def health(server) -> dict:
    return httpx.get(server.url + "/health").json()


def generated_tokens(server) -> int:
    text = httpx.get(server.url + "/metrics").text
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("minigpt_generated_tokens")))


def wait_until_idle(server, limit: float = 5.0) -> float:
    """Seconds until the server has no running and no waiting sequences (fails after `limit`)."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        h = health(server)
        if h["running"] == 0 and h["queued"] == 0:
            return time.perf_counter() - start
        time.sleep(0.02)
    raise AssertionError(f"still busy after {limit} s: {health(server)}")


# ----------------------------------------------------------------------------------------------------------------
# Chat


def test_greedy_chat_answers_like_the_engine(chat, client):
    _, model, tokenizer = chat
    reply = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Hello"}],
                                           temperature=0)
    assert reply.choices[0].message.content == "Hi there!"
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.role == "assistant"
    prompt, _ = render(tokenizer, [{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    offline = greedy_offline(model, prompt, stop_ids(tokenizer), 64)
    assert tokenizer.decode(offline) == "Hi there!"
    # usage counts the prompt and every generated token, the closing <|end|> included
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), len(offline) + 1)


def test_streamed_chat_matches_and_ends_with_usage(client):
    messages = [{"role": "user", "content": "How are you?"}]
    chunks = list(client.chat.completions.create(model="chat", messages=messages, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "I am fine, thank you."
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 2  # token by token
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_chat_logprobs_and_n(client):
    reply = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "What is your name?"}],
                                           n=3, temperature=1.0, seed=5, logprobs=True, top_logprobs=2,
                                           max_completion_tokens=20)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage.completion_tokens == sum(len(c.logprobs.content) for c in reply.choices)
    for choice in reply.choices:
        for item in choice.logprobs.content:
            assert item.logprob <= 0 and len(item.top_logprobs) == 2
            assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob


def test_seeded_sampling_repeats(client):
    def ask(seed):
        return client.completions.create(model="chat", prompt="The", max_tokens=12, temperature=1.0, seed=seed,
                                         n=2).choices

    first, again = ask(11), ask(11)
    assert [c.text for c in first] == [c.text for c in again]
    assert first[0].text != first[1].text or len(first[0].text) == 0  # the n choices draw different seeds


# ----------------------------------------------------------------------------------------------------------------
# Completions


def test_completion_text_streamed_or_not_equals_the_engine(chat, client):
    _, model, tokenizer = chat
    plain = client.completions.create(model="chat", prompt="The city", max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="chat", prompt="The city", max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    offline = greedy_offline(model, tokenizer.encode_ordinary("The city"), end_of_turn_ids(tokenizer), 10)
    assert plain.choices[0].text == streamed == tokenizer.decode(offline) != ""
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


def test_greedy_completions_stop_where_the_exported_model_stops(chat, chat_run, client, tmp_path, monkeypatch):
    """/v1/completions on a chat run against Hugging Face `generate` on its export (generation_config.json):
    the same tokens, the same end of turn, and no special token in the text."""
    transformers = pytest.importorskip("transformers")
    from minigpt.interop.hf import export_hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, _, tokenizer = chat
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(chat_run, tmp_path / "hf")).eval()
    as_text = lambda t: tokenizer.token_bytes(t).decode("utf-8", "replace")  # noqa: E731
    stops = end_of_turn_ids(tokenizer)
    ended = []
    for prompt in ("<|endoftext|><|user|>Hello<|end|><|assistant|>", "<|user|>What is your name?<|end|><|assistant|>",
                   "<|endoftext|><|user|>Tell me about Paris.<|end|><|assistant|>", "The city", "Hello, I am"):
        ids = tokenizer.encode(prompt, allowed_special="all")
        choice = client.completions.create(model="chat", prompt=prompt, max_tokens=40, temperature=0,
                                           logprobs=0).choices[0]
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=40)
        theirs = out[0, len(ids):].tolist()
        stopped = theirs[-1] in stops
        assert choice.logprobs.tokens == [as_text(t) for t in theirs]  # token for token, the end of turn included
        assert choice.finish_reason == ("stop" if stopped else "length")
        assert choice.text == tokenizer.decode(theirs[:-1] if stopped else theirs)
        assert "<|" not in choice.text
        ended.append(stopped)
    assert ended[:3] == [True, True, True]  # the chat-shaped prompts end their turn


def test_special_tokens_are_left_out_of_the_text_unless_asked(chat, client):
    _, _, tokenizer = chat
    user = str(tokenizer.chat_token_ids["<|user|>"])  # forced: the model would rarely say it
    messages = [{"role": "user", "content": "Hello"}]
    for show, expected in ((None, ""), (True, ""), (False, "<|user|>" * 3)):
        extra = {} if show is None else {"extra_body": {"skip_special_tokens": show}}
        text = client.completions.create(model="chat", prompt="The city", max_tokens=3, temperature=0,
                                         logit_bias={user: 100}, **extra).choices[0].text
        reply = client.chat.completions.create(model="chat", messages=messages, max_tokens=3, temperature=0,
                                               logit_bias={user: 100}, **extra).choices[0].message.content
        assert text == reply == expected


def test_prompt_forms_and_choice_order(chat, client):
    _, _, tokenizer = chat
    ids = tokenizer.encode_ordinary("The city")
    as_text = client.completions.create(model="chat", prompt="The city", max_tokens=5, temperature=0)
    for prompt in (ids, [ids], ["The city"]):
        same = client.completions.create(model="chat", prompt=prompt, max_tokens=5, temperature=0)
        assert same.choices[0].text == as_text.choices[0].text
    many = client.completions.create(model="chat", prompt=[ids, ids[:1]], n=2, max_tokens=3, temperature=0)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text and many.usage.prompt_tokens == len(ids) + 1


def test_stop_strings_end_the_text_before_them(client):
    base = client.completions.create(model="chat", prompt="The city", max_tokens=12, temperature=0).choices[0].text
    stop = base[len(base) // 2:len(base) // 2 + 2]
    cut = client.completions.create(model="chat", prompt="The city", max_tokens=12, temperature=0,
                                    stop=[stop, "never appears"])
    assert cut.choices[0].text == base[:base.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="chat", prompt="The city", max_tokens=12, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text


def test_a_stop_string_completed_by_the_last_allowed_token_is_a_stop(client):
    gen = client.completions.create(model="chat", prompt="The city", max_tokens=12, temperature=0, logprobs=0)
    text, tokens = gen.choices[0].text, gen.choices[0].logprobs.tokens
    for k in range(1, len(tokens)):  # a stop string across tokens k-1 and k, first seen where token k ends
        stop = tokens[k - 1] + tokens[k]
        if "bytes:" not in stop and stop.strip() and text.find(stop) + len(stop) == len("".join(tokens[:k + 1])):
            break
    else:
        pytest.skip("no stop string ends first at a token boundary in this model's text")
    cut = client.completions.create(model="chat", prompt="The city", max_tokens=k + 1, temperature=0, stop=stop)
    assert (cut.choices[0].text, cut.choices[0].finish_reason) == (text[:text.find(stop)], "stop")


@torch.inference_mode()
def test_logprobs_equal_the_models_own(chat, client):
    _, model, tokenizer = chat
    prompt = tokenizer.encode_ordinary("The city of Paris is")
    echo = client.completions.create(model="chat", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    lp = echo.choices[0].logprobs
    direct = model(torch.tensor([prompt]))[0][0].float().log_softmax(-1)  # (T, V)
    expected = [direct[t - 1, prompt[t]].item() for t in range(1, len(prompt))]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert echo.choices[0].text == tokenizer.decode(prompt) and len(lp.tokens) == len(prompt)
    assert lp.text_offset == [len(tokenizer.decode(prompt[:i])) for i in range(len(prompt))]
    assert echo.usage.completion_tokens == 0
    # generated tokens: the engine's log-probs (KV cache) against a forward pass over the whole sequence
    gen = client.completions.create(model="chat", prompt=prompt, max_tokens=4, temperature=0, logprobs=3)
    tokens = gen.choices[0].logprobs.tokens
    ids = prompt + tokenizer.encode_ordinary(gen.choices[0].text)
    direct = model(torch.tensor([ids]))[0][0].float().log_softmax(-1)
    expected = [direct[t - 1, ids[t]].item() for t in range(len(prompt), len(ids))]
    assert len(tokens) == len(expected) == 4
    assert gen.choices[0].logprobs.token_logprobs == pytest.approx(expected, abs=1e-4)
    for top, chosen in zip(gen.choices[0].logprobs.top_logprobs, tokens, strict=True):
        assert max(top, key=top.get) == chosen  # greedy: the chosen token is the most likely one


def test_penalties_and_logit_bias_are_honoured(chat, client):
    _, _, tokenizer = chat
    banned = tokenizer.encode_ordinary(" the")[0]
    text = client.completions.create(model="chat", prompt="The city", max_tokens=20, temperature=0,
                                     logit_bias={str(banned): -100}, logprobs=0).choices[0]
    assert tokenizer.token_bytes(banned).decode() not in text.logprobs.tokens
    forced = client.completions.create(model="chat", prompt="The city", max_tokens=3, temperature=0,
                                       logit_bias={str(banned): 100})
    assert forced.choices[0].text == tokenizer.decode([banned] * 3)
    penalised = client.completions.create(model="chat", prompt="The city", max_tokens=30, temperature=0,
                                          frequency_penalty=2.0, presence_penalty=2.0, logprobs=0)
    tokens = penalised.choices[0].logprobs.tokens
    assert len(set(tokens)) > len(tokens) // 2  # repetition is pushed down


# ----------------------------------------------------------------------------------------------------------------
# Errors, limits, security


def test_errors_are_typed_with_code_and_param(chat, client):
    server = chat[0]
    long_text = "word " * 200
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": long_text}])
    assert (err.value.code, err.value.param) == ("context_length_exceeded", "messages")
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="chat", prompt=long_text)
    assert (err.value.code, err.value.param) == ("context_length_exceeded", "prompt")
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hello"}])
    assert (err.value.code, err.value.param) == ("model_not_found", "model")
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert (err.value.code, err.value.param) == ("invalid_api_key", None)
    for kwargs, param in [({"max_tokens": 10_000}, "max_tokens"), ({"n": 99}, "n"), ({"temperature": 3}, "temperature"),
                          ({"temperature": "hot"}, "temperature"), ({"logit_bias": {"x": 1}}, "logit_bias"),
                          ({"logit_bias": {"--5": 1}}, "logit_bias"), ({"logit_bias": {"\u00b2": 1}}, "logit_bias"),
                          ({"max_tokens": "2"}, "max_tokens"), ({"top_p": 0}, "top_p")]:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="chat", prompt="Hi", **kwargs)
        assert err.value.param == param, kwargs
    # the prompt fits the 64-token window, but not with the completion asked for (OpenAI and vLLM refuse it too)
    prompt = chat[2].encode_ordinary("word " * 10)
    for create, kwargs, param in [(client.completions.create, {"prompt": prompt, "max_tokens": 60}, "max_tokens"),
                                  (client.chat.completions.create, {"messages": [{"role": "user", "content": "Hi"}],
                                   "max_completion_tokens": 63}, "max_completion_tokens")]:
        with pytest.raises(openai.BadRequestError) as err:
            create(model="chat", **kwargs)
        assert (err.value.code, err.value.param) == ("context_length_exceeded", param)
    # unasked, the completion is cut to the room the window leaves
    full = client.completions.create(model="chat", prompt=(prompt * 6)[:54], temperature=0, logit_bias={
        str(chat[2].eot_id): -100})  # OpenAI's default is 16 tokens; 10 are left
    assert full.usage.completion_tokens == 10 and full.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="chat", messages=[{"role": "robot", "content": "Hi"}])
    assert err.value.param == "messages.[0].role"


def test_raw_http_errors_never_500(chat):
    server = chat[0]
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    cases = [(b"{not json", 400), (b"[1, 2]", 400), (b"", 400), (b'{"prompt": {"a": 1}}', 400),
             (b'{"prompt": "x", "n": null, "seed": null, "logprobs": null, "stop": null, "whatever": 1}', 200),
             (b'{"prompt": "x", "max_tokens": 1, "stream_options": null, "echo": null}', 200),
             (b'{"prompt": "x", "stream": "false"}', 400), (b'{"prompt": "x", "max_tokens": 2.5}', 400),
             (b'{"prompt": "x", "logit_bias": {"--5": 1}}', 400), (b'{"prompt": "x", "temperature": 1}', 200),
             (b'{"prompt": "' + b"x" * (2 << 20) + b'"}', 413)]
    for body, status in cases:
        r = httpx.post(server.url + "/v1/completions", content=body, headers=auth, timeout=30)
        assert r.status_code == status, (body[:40], r.text)
        if status != 200:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(server.url + "/nowhere", headers=auth).status_code == 404
    assert httpx.get(server.url + "/v1/completions", headers=auth).status_code == 405
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x"})  # no key
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").status_code == 200  # open for probes


def test_no_cors_unless_asked(chat, slow):
    server = chat[0]
    r = httpx.options(server.url + "/v1/chat/completions",
                      headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    from starlette.testclient import TestClient

    tokenizer = slow[1]
    model = GPT(ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=tokenizer.n_vocab))
    app = create_app(model, tokenizer, ServeConfig(model="m", cors_origin=["https://ok.example"]), "m")
    with TestClient(app) as tc:
        r = tc.options("/v1/completions", headers={"Origin": "https://ok.example",
                                                    "Access-Control-Request-Method": "POST"})
        assert r.headers["access-control-allow-origin"] == "https://ok.example"


def test_tokenizer_endpoints_and_models(chat, client):
    server, _, tokenizer = chat
    auth = {"Authorization": f"Bearer {KEY}"}
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}, headers=auth).json()
    assert ids["tokens"] == tokenizer.encode_ordinary("Hello world") and ids["count"] == len(ids["tokens"])
    back = httpx.post(server.url + "/detokenize", json={"tokens": ids["tokens"]}, headers=auth).json()
    assert back == {"prompt": "Hello world"}
    chat_ids = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "Hello"}]},
                          headers=auth).json()["tokens"]
    assert chat_ids == render(tokenizer, [{"role": "user", "content": "Hello"}], add_generation_prompt=True)[0]
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]  # joined as fine-tuning joins them
    part_ids = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": parts}]},
                          headers=auth).json()["tokens"]
    assert part_ids == render(tokenizer, [{"role": "user", "content": "Hello\nthere"}], add_generation_prompt=True)[0]
    info = httpx.get(server.url + "/tokenizer_info", headers=auth).json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 64
    assert [m.id for m in client.models.list()] == ["chat"]
    assert client.models.retrieve("chat").id == "chat"


def test_one_chat_format_for_the_trainer_the_server_and_the_export(chat, tmp_path):
    """Every role (developer too) renders to the same tokens through fine-tuning's `render`, the server's
    /tokenize, the server's published Jinja template and the exported tokenizer's apply_chat_template."""
    transformers = pytest.importorskip("transformers")
    jinja2 = pytest.importorskip("jinja2")
    from minigpt.interop.hf_tokenizer import save_hf_tokenizer

    server, _, tokenizer = chat
    auth = {"Authorization": f"Bearer {KEY}"}
    save_hf_tokenizer(tokenizer, tmp_path, 64)
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path)
    template = httpx.get(server.url + "/tokenizer_info", headers=auth).json()["chat_template"]
    conversations = [
        [{"role": "developer", "content": "Answer in one line."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Where is Paris?"}],
        [{"role": "system", "content": "Be kind."}, {"role": "developer", "content": "Be brief."},
         {"role": "user", "content": "Name a river."}, {"role": "assistant", "content": "The Seine."}],
    ]
    for messages in conversations:
        for prompt in (True, False):
            ids = render(tokenizer, messages, add_generation_prompt=prompt)[0]
            served = httpx.post(server.url + "/tokenize", headers=auth, json={
                "messages": messages, "add_generation_prompt": prompt}).json()["tokens"]
            text = jinja2.Environment().from_string(template).render(messages=messages, add_generation_prompt=prompt)
            assert served == ids
            assert text == tokenizer.decode(ids)
            assert exported.apply_chat_template(messages, add_generation_prompt=prompt, return_dict=False) == ids
    with pytest.raises(Exception, match="unknown chat role"):
        exported.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_metrics_count_requests_tokens_and_first_token_times(chat, client):
    client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Hello"}], temperature=0)
    text = httpx.get(chat[0].url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values['minigpt_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    assert values["minigpt_generated_tokens_total"] > 0
    assert values["minigpt_time_to_first_token_seconds_count"] >= 1
    assert values["minigpt_running_sequences"] == 0 and values["minigpt_queue_depth"] == 0


# ----------------------------------------------------------------------------------------------------------------
# Scheduling: disconnects, a full queue, time limits


def long_request(tokenizer, **kwargs) -> dict:
    """A completion that would run to the window's end: the end-of-turn tokens are forbidden by logit_bias."""
    return {"model": "slow", "prompt": "The", "max_tokens": 1000,
            "logit_bias": {str(t): -100 for t in end_of_turn_ids(tokenizer)}, **kwargs}


def test_a_client_that_disconnects_frees_its_row(slow):
    server, tokenizer = slow
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    before = generated_tokens(server)
    stream = client.completions.create(stream=True, **long_request(tokenizer))
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert health(server)["running"] == 1
    stream.close()
    assert wait_until_idle(server, limit=2.0) < 1.0
    assert generated_tokens(server) - before < 500  # stopped early, not run to its 1000 tokens
    # a plain (not streamed) request whose client gives up is cancelled too
    before = generated_tokens(server)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=long_request(tokenizer), timeout=0.3)
    assert wait_until_idle(server, limit=2.0) < 1.0
    assert generated_tokens(server) - before < 500


def test_a_full_queue_answers_429(slow):
    server, tokenizer = slow
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    running = client.completions.create(stream=True, **long_request(tokenizer))
    next(iter(running))  # it holds the only row
    waiting = threading.Thread(target=lambda: client.completions.create(model="slow", prompt="A", max_tokens=2))
    waiting.start()
    deadline = time.monotonic() + 5
    while health(server)["queued"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(model="slow", prompt="B", max_tokens=2)
    assert err.value.code == "queue_full"
    running.close()
    waiting.join(10)
    assert not waiting.is_alive()
    wait_until_idle(server)


def test_max_queue_zero_serves_when_a_row_is_free(slow):
    _, tokenizer = slow
    app = create_app(slow_model(tokenizer), tokenizer, ServeConfig(model="slow", max_batch=1, max_queue=0), "slow")
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        assert client.completions.create(model="slow", prompt="A", max_tokens=2).usage.completion_tokens == 2
        running = client.completions.create(stream=True, **long_request(tokenizer))
        next(iter(running))  # it holds the only row: nothing may wait
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="slow", prompt="B", max_tokens=2)
        running.close()
        wait_until_idle(server)


def test_the_time_limit_ends_a_request_as_length(slow):
    _, tokenizer = slow
    app = create_app(slow_model(tokenizer), tokenizer, ServeConfig(model="slow", request_timeout=0.4), "slow")
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        start = time.perf_counter()
        reply = client.completions.create(**long_request(tokenizer))
        assert time.perf_counter() - start < 3
        assert reply.choices[0].finish_reason == "length" and 0 < reply.usage.completion_tokens < 1000


# ----------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness through the server


def test_lm_eval_local_completions_matches_our_scores(chat, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from minigpt.eval.scoring import encode_pair, score_pairs

    server, model, tokenizer = chat
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # local-completions sends it as the Bearer token
    rows = [{"q": "The capital of France is", "choices": ["Paris", "London", "Rome"], "label": 0},
            {"q": "Hello, my name", "choices": ["is", "was"], "label": 0},
            {"q": "The city", "choices": ["of", "is", "has many people"], "label": 0},
            {"q": "What is your", "choices": ["name?", "age?"], "label": 0}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "serve_mc.yaml").write_text(
        "task: serve_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    # tokenizer_backend is left to lm-eval's "auto": it finds /tokenizer_info and /tokenize and uses ours
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)  # skips indexing 14k built-in tasks
    results = lm_eval.simple_evaluate(
        model="local-completions", tasks=["serve_mc"], task_manager=tasks,
        model_args=f"model=chat,base_url={server.url}/v1/completions,max_length=64,auth_token={KEY}",
        log_samples=True)
    samples = results["samples"]["serve_mc"]
    assert len(samples) == len(rows)
    pairs, theirs = [], []
    for sample in samples:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"], strict=True):
            pairs.append(encode_pair(tokenizer, context, continuation))
            theirs.append(resp[0][0])
    ours = [s.logprob for s in score_pairs(model, pairs)]
    assert theirs == pytest.approx(ours, abs=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# The command and the optional dependency


def test_import_minigpt_does_not_pull_in_the_web_stack():
    code = ("import sys, minigpt, minigpt.cli, minigpt.serve.serve, minigpt.chat.engine; "
            "print(any(m in sys.modules for m in ('fastapi', 'uvicorn', 'starlette', 'pydantic')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    # without FastAPI, `minigpt serve` says what to install (`None` in sys.modules makes an import fail)
    code = "import sys; sys.modules['fastapi'] = None; from minigpt.cli import main; sys.exit(main(['serve']))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2 and "pip install minigpt[serve]" in done.stderr


def test_serve_command_binds_loopback_and_names_the_model_after_the_run(chat_run):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MINIGPT_API_KEY": "from-env"}
    proc = subprocess.Popen([sys.executable, "-m", "minigpt", "serve", "--model", str(chat_run), "--port", str(port),
                             "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            time.sleep(0.2)
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer from-env"}).json()
        assert models["data"][0]["id"] == chat_run.name
        assert httpx.get(url + "/v1/models").status_code == 401
        assert "minigpt chat" in httpx.get(url + "/").text
    finally:
        proc.terminate()
        proc.wait(10)
    help_text = subprocess.run([sys.executable, "-m", "minigpt", "serve", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "--max-batch" in help_text.stdout and "--api-key" in help_text.stdout
