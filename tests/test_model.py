"""The model against Hugging Face's GPT-2, GPT-2's published sizes, and its own gradient checkpointing."""

import math

import pytest
import torch

from minigpt.cli import main as cli_main
from minigpt.common import UserError
from minigpt.common.config import from_dict
from minigpt.interop.hf import config_from_hf, from_hf_state_dict, hf_config_dict, to_hf_state_dict
from minigpt.model.cache import KVCache
from minigpt.model.gpt import GPT, PRESETS, ModelConfig

transformers = pytest.importorskip("transformers")

SHAPES = [
    ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=1000),  # vocabulary padded to 1024
    ModelConfig(n_layer=3, n_head=3, n_embd=96, block_size=48, vocab_size=259),
    ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=512, bias=False),  # zero biases in HF
    ModelConfig(n_layer=1, n_head=1, n_embd=32, block_size=16, vocab_size=100, pad_vocab_multiple=1),
]


def hf_model(cfg: ModelConfig) -> "transformers.GPT2LMHeadModel":
    data = hf_config_dict(cfg, bos_token_id=0, eos_token_id=0)
    data.pop("architectures")
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**data)).eval()


def assert_close_relative(ours: torch.Tensor, theirs: torch.Tensor, rel: float = 1e-5) -> None:
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() <= rel * scale, f"max difference {(ours - theirs).abs().max()} vs {scale}"


@pytest.mark.parametrize("cfg", SHAPES, ids=lambda c: f"L{c.n_layer}H{c.n_head}C{c.n_embd}V{c.vocab_size}b{c.bias}")
def test_logits_equal_huggingface(cfg):
    torch.manual_seed(0)
    ours = GPT(cfg).eval()
    theirs = hf_model(cfg)
    missing, unexpected = theirs.load_state_dict(to_hf_state_dict(ours), strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.block_size))
    with torch.no_grad():
        our_logits, _ = ours(idx)
        their_logits = theirs(idx).logits
    assert our_logits.shape == their_logits.shape == (3, cfg.block_size, cfg.vocab_size)
    assert_close_relative(our_logits, their_logits)


@pytest.mark.parametrize("cfg", [c for c in SHAPES if c.bias], ids=str)
def test_weights_convert_both_ways(cfg):
    torch.manual_seed(1)
    theirs = hf_model(cfg)  # Hugging Face's own random initialisation
    imported_cfg = config_from_hf(hf_config_dict(cfg))
    ours = GPT(imported_cfg).eval()
    ours.load_state_dict(from_hf_state_dict(theirs.state_dict(), imported_cfg))
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    with torch.no_grad():
        assert_close_relative(ours(idx)[0], theirs(idx).logits)
    back = to_hf_state_dict(ours)
    for name, tensor in theirs.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(back[name], tensor), name


@pytest.mark.parametrize("preset,published", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                              ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_parameter_counts_match_published_sizes(preset, published):
    with torch.device("meta"):
        model = GPT(ModelConfig.from_preset(preset))
    assert model.num_params() == published
    assert model.config.padded_vocab_size == 50304


def test_flops_per_token_by_hand():
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=8, block_size=16, vocab_size=10, pad_vocab_multiple=1)
    model = GPT(cfg)
    C, L, V, T = 8, 2, 10, 16
    per_block = (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C) + 4 * C
    n = V * C + L * per_block + 2 * C  # wte (= head) + blocks + ln_f; wpe excluded
    assert model.flops_per_token() == 6 * n + 12 * L * C * T
    assert model.num_params() == n + T * C


def test_gpt2_initialisation():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=8, n_head=4, n_embd=256, block_size=64, vocab_size=1000)
    model = GPT(cfg)
    assert model.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.h[0].mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)
    assert model.h[0].attn.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)
    assert torch.all(model.h[0].attn.c_attn.bias == 0)
    assert model.lm_head.weight is model.wte.weight
    assert torch.all(model.wte.weight[1000:] == 0)


def test_vocabulary_padding_is_never_predicted_nor_trained():
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=100)
    model = GPT(cfg)
    idx = torch.randint(0, 100, (2, 16))
    logits, loss = model(idx, targets=idx)
    assert logits.shape[-1] == 100
    loss.backward()
    assert torch.all(model.wte.weight.grad[100:] == 0)


def test_ignored_targets_do_not_count():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50))
    idx = torch.randint(0, 50, (1, 16))
    targets = idx.clone()
    targets[0, :8] = -100
    logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[0, 8:], idx[0, 8:])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, dropout=0.5))
    idx = torch.randint(0, 50, (1, 16))
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])


def saved_activation_bytes(model: GPT, idx: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes of tensors autograd keeps for the backward pass (parameters excluded): the activation memory."""
    params = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(idx, targets=idx)
    return total, loss


def test_gradient_checkpointing_same_loss_and_gradients_less_memory():
    cfg = ModelConfig(n_layer=4, n_head=4, n_embd=64, block_size=64, vocab_size=300)
    torch.manual_seed(0)
    plain = GPT(cfg).train()
    ckpt = GPT(ModelConfig(**{**cfg.__dict__, "gradient_checkpointing": True})).train()
    ckpt.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 300, (4, 64))
    plain_bytes, plain_loss = saved_activation_bytes(plain, idx)
    ckpt_bytes, ckpt_loss = saved_activation_bytes(ckpt, idx)
    assert ckpt_loss.item() == plain_loss.item()
    plain_loss.backward()
    ckpt_loss.backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert ckpt_bytes < 0.5 * plain_bytes, (ckpt_bytes, plain_bytes)


def test_kv_cache_forward_equals_full_forward():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50)).eval()
    idx = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model.config, rows=2)
        pieces = [model(idx[:, :9], cache=cache)[0]] + [model(idx[:, t : t + 1], cache=cache)[0] for t in range(9, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.lengths.tolist() == [20, 20]


def test_presets_are_consistent():
    for name, shape in PRESETS.items():
        cfg = ModelConfig.from_preset(name)
        assert cfg.n_embd % cfg.n_head == 0 and cfg.preset == name and cfg.n_layer == shape["n_layer"]
    assert from_dict(ModelConfig, {"preset": "mini", "n_layer": 2}) == ModelConfig.from_preset("mini", n_layer=2)


def test_an_unknown_preset_is_refused_in_one_line_however_it_is_named(capsys):
    with pytest.raises(ValueError, match="unknown preset 'gpt3' \\(known: tiny, mini, gpt2,"):
        ModelConfig.from_preset("gpt3")
    with pytest.raises(UserError, match="^invalid model settings: unknown preset 'gpt3' \\(known: tiny, [^\\n]*\\)$"):
        from_dict(ModelConfig, {"preset": "gpt3"}, "model")
    assert cli_main(["model", "--preset", "gpt3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown preset 'gpt3'" in err and len(err.splitlines()) == 1


def test_context_window_enforced():
    model = GPT(ModelConfig(n_layer=1, n_head=1, n_embd=16, block_size=8, vocab_size=20))
    with pytest.raises(ValueError, match="context window"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_chunked_loss_equals_the_plain_loss_and_gradients(chunk):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=200)  # 256 rows with padding
    plain, chunked = GPT(cfg), GPT(cfg)
    chunked.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 200, (3, 32))
    targets = torch.randint(0, 200, (3, 32))
    targets[0, :10] = -100
    _, a = plain(idx, targets, reduction="sum")
    logits, b = chunked(idx, targets, reduction="sum", chunk_rows=chunk)
    assert logits is None
    assert b.item() == pytest.approx(a.item(), rel=1e-5)
    (2.5 * a).backward()
    (2.5 * b).backward()
    # float32 sums in another order: elements near zero differ by the rounding of the tensor's large ones, so the
    # absolute tolerance scales with the gradient (a wrong chunk or scale differs by the gradient's own size)
    for (name, p), q in zip(plain.named_parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=2e-6 * p.grad.abs().max().item(), msg=name)
    assert torch.all(chunked.wte.weight.grad[200:] == 0)
    with torch.no_grad():
        _, mean_plain = plain(idx, targets)
        _, mean_chunked = chunked(idx, targets, chunk_rows=chunk)
    assert mean_chunked.item() == pytest.approx(mean_plain.item(), rel=1e-5)
