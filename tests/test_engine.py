"""The generation engine: KV cache vs recomputation, batching, sampling rules, streaming, text decoding."""

import math
from collections.abc import Iterator

import pytest
import torch

from minigpt.chat.engine import Engine, Generation, SamplingParams, TextDecoder, sample
from minigpt.eval import reference
from minigpt.model.cpu_inference import is_packed, prepacked
from minigpt.model.gpt import GPT, ModelConfig


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=48, block_size=64, vocab_size=97)).eval()


@pytest.fixture(scope="module")
def packed_model() -> Iterator[GPT]:
    """The same model with every linear weight prepacked for oneDNN, as the engine does for large ones on CPUs."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=48, block_size=64, vocab_size=97)).eval()
    with prepacked(model, min_weight=0):
        if not is_packed(model.lm_head):
            pytest.skip("no oneDNN on this machine: nothing is packed")
        yield model


UNEVEN = [[1, 2, 3], [5] * 17, [7, 8], [9, 10, 11, 12, 13, 14, 15], list(range(40)), [42]]


@pytest.mark.parametrize("packed", [False, True], ids=["default-kernels", "onednn-packed"])
def test_kv_cache_greedy_equals_recomputation_in_uneven_batches(model, packed_model, packed):
    model = packed_model if packed else model
    params = SamplingParams(max_new_tokens=20, temperature=0)
    for max_batch in (1, 3, 8):  # 3 < prompts: rows are reused as sequences finish
        completions = Engine(model, max_batch=max_batch).generate(UNEVEN, params)
        for prompt, completion in zip(UNEVEN, completions, strict=True):
            assert completion.tokens == reference.generate(model, prompt, params)


def test_seeded_sampling_does_not_depend_on_batch_company(model):
    params = SamplingParams(max_new_tokens=15, temperature=0.9, top_k=20, top_p=0.95, seed=7)
    alone = [Engine(model, max_batch=1).generate([p], params)[0].tokens for p in UNEVEN]
    together = [c.tokens for c in Engine(model, max_batch=4).generate(UNEVEN[::-1], params)][::-1]
    assert alone == together
    assert alone[0] == reference.generate(model, UNEVEN[0], params)
    other_seed = Engine(model).generate([UNEVEN[0]], SamplingParams(max_new_tokens=15, temperature=0.9, seed=8))
    assert other_seed[0].tokens != alone[0]


def test_length_is_bounded_by_the_context_window(model):
    prompt = list(range(60))
    (completion,) = Engine(model).generate([prompt], SamplingParams(max_new_tokens=100, temperature=0))
    assert len(completion.tokens) == 4 and completion.finish_reason == "length"
    with pytest.raises(ValueError, match="context window"):
        Engine(model).generate([list(range(64))], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        Engine(model).generate([[]], SamplingParams())


def test_stop_tokens_end_a_sequence_and_are_not_output(model):
    params = SamplingParams(max_new_tokens=20, temperature=0)
    free = Engine(model).generate([UNEVEN[1]], params)[0].tokens
    stop = free[5]
    first = free.index(stop)
    stopped = Engine(model).generate([UNEVEN[1]], SamplingParams(max_new_tokens=20, temperature=0,
                                                                  stop_token_ids=[stop]))[0]
    assert stopped.tokens == free[:first] and stopped.finish_reason == "stop"


def test_stream_yields_each_token_as_it_is_made(model):
    params = SamplingParams(max_new_tokens=6, temperature=0)
    steps = list(Engine(model, max_batch=2).stream(UNEVEN[:3], params))
    per_prompt = {i: [e.token for s in steps for e in s if e.index == i] for i in range(3)}
    expected = Engine(model).generate(UNEVEN[:3], params)
    assert [per_prompt[i] for i in range(3)] == [c.tokens for c in expected]
    assert all(len(s) <= 2 * 2 for s in steps)  # per row: at most a prefill token and a decoded one
    assert len(steps) >= 6  # tokens arrive over many steps, not all at the end
    finishes = [e for s in steps for e in s if e.finish_reason]
    assert sorted(e.index for e in finishes) == [0, 1, 2]


def test_cancel_frees_the_row_and_others_continue(model):
    engine = Engine(model, max_batch=2)
    params = SamplingParams(max_new_tokens=10, temperature=0)
    a, b = engine.new_generation(UNEVEN[0], params), engine.new_generation(UNEVEN[1], params)
    engine.add([a, b])
    engine.step()
    engine.cancel(a)
    assert engine.free_rows == 1 and a.finish_reason == "cancelled"
    while engine.live:
        engine.step()
    assert b.output == Engine(model).generate([UNEVEN[1]], params)[0].tokens


def gen(logits_row_count: int = 1, **kwargs) -> list[Generation]:
    params = SamplingParams(**kwargs)
    return [Generation(i, [0], params, 10, torch.Generator().manual_seed(i)) for i in range(logits_row_count)]


def test_greedy_picks_the_argmax_and_reports_logprobs():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    tokens, logprobs, tops = sample(logits, gen(temperature=0, top_logprobs=2))
    assert tokens == [1]
    assert logprobs[0] == pytest.approx(torch.log_softmax(logits, -1)[0, 1].item())
    assert [t for t, _ in tops[0]] == [1, 3]


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    seen_k = {sample(logits, [Generation(0, [0], SamplingParams(top_k=2), 1, torch.Generator().manual_seed(s))])[0][0]
              for s in range(200)}
    assert seen_k == {0, 1}
    seen_p = {sample(logits, [Generation(0, [0], SamplingParams(top_p=0.75), 1, torch.Generator().manual_seed(s))])
              [0][0] for s in range(200)}
    assert seen_p == {0, 1, 2}  # 0.4 + 0.3 < 0.75, so the third is needed; the fourth never


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    logits = probs.log()[None].repeat(4000, 1)
    gens = [Generation(i, [0], SamplingParams(temperature=1.0), 1, torch.Generator().manual_seed(i))
            for i in range(4000)]
    tokens, _, _ = sample(logits, gens)
    freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)
    # temperature 0.5 squares the probabilities (then renormalises)
    gens = [Generation(i, [0], SamplingParams(temperature=0.5), 1, torch.Generator().manual_seed(i))
            for i in range(4000)]
    tokens, _, _ = sample(logits, gens)
    freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / 4000
    assert torch.allclose(freq, probs**2 / (probs**2).sum(), atol=0.03)


def test_penalties_and_logit_bias():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    assert sample(logits, gen(temperature=0, logit_bias={2: 5.0}))[0] == [2]
    (g,) = gen(temperature=0, presence_penalty=0.5)
    g.output = [0]
    assert sample(logits, [g])[0] == [1]
    (g,) = gen(temperature=0, frequency_penalty=0.05)
    g.output = [0, 0]  # 2.0 - 0.1 < 1.9 only just
    assert sample(logits.clone(), [g])[0] == [0]
    (g,) = gen(temperature=0, frequency_penalty=0.06)
    g.output = [0, 0]
    assert sample(logits.clone(), [g])[0] == [1]


def test_text_decoder_holds_split_characters_and_stop_strings():
    pieces = {0: b"h", 1: "é".encode()[:1], 2: "é".encode()[1:], 3: b"<", 4: b"|end", 5: b"|>", 6: b"<b"}
    decoder = TextDecoder(pieces.__getitem__, stop=["<|end|>"])
    assert decoder.push(0) == "h"
    assert decoder.push(1) == ""  # half a character waits
    assert decoder.push(2) == "é"
    assert decoder.push(3) == ""  # may start the stop string
    assert decoder.push(6) == "<<b"  # it did not
    assert decoder.push(3) == "" and decoder.push(4) == "" and decoder.push(5) == ""
    assert decoder.stopped and decoder.text == "hé<<b"
    assert decoder.push(0) == ""
    plain = TextDecoder(pieces.__getitem__)
    assert plain.push(1) == "" and plain.finish() == "\ufffd"  # an unfinished character at the end


def test_text_decoder_leaves_out_skipped_tokens():
    pieces = {0: b"Hi", 1: b"<|user|>", 2: "é".encode()[:1], 3: "é".encode()[1:]}
    decoder = TextDecoder(pieces.__getitem__, skip={1})
    assert [decoder.push(t) for t in (0, 1, 2, 1, 3)] == ["Hi", "", "", "", "é"]  # even inside a split character
    assert decoder.text == "Hié"
    assert "".join(TextDecoder(pieces.__getitem__).push(t) for t in (0, 1)) == "Hi<|user|>"


def test_sample_stops_at_a_chat_runs_end_of_turn(chat_run, capsys):
    from minigpt.cli import main as cli_main
    from minigpt.runs.loading import load_run
    from minigpt.text.chat_format import end_of_turn_ids

    model, tokenizer, _ = load_run(chat_run)
    prompt = [tokenizer.eot_id] + tokenizer.encode_ordinary("Hello")
    greedy = lambda stop: Engine(model).generate([prompt], SamplingParams(40, 0, stop_token_ids=stop))[0].tokens  # noqa: E731
    on_and_on = greedy([tokenizer.eot_id])
    assert tokenizer.chat_token_ids["<|end|>"] in on_and_on  # the chat model ends its turn, then goes on
    assert cli_main(["sample", str(chat_run), "--prompt", "Hello", "--temperature", "0",
                     "--max-new-tokens", "40"]) == 0
    out = capsys.readouterr().out
    assert out == "Hello" + tokenizer.decode(greedy(end_of_turn_ids(tokenizer))) + "\n" and "<|" not in out


def test_sampling_params_validate():
    for bad in (dict(temperature=-1), dict(top_p=0.0), dict(top_k=-1), dict(max_new_tokens=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert math.isclose(SamplingParams().top_p, 1.0)


def test_sample_command_is_seeded_and_checks_its_flags(base_run, capsys):
    from minigpt.cli import main as cli_main

    args = ["sample", str(base_run), "--prompt", "The", "--max-new-tokens", "12", "--seed", "3"]
    assert cli_main(args) == 0
    first = capsys.readouterr().out
    assert cli_main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("The") and len(first) > 4
    assert cli_main(["sample", str(base_run), "--num-samples", "3", "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.count("--- sample") == 3
    assert cli_main(["sample", str(base_run), "--temperature", "-1"]) == 2
