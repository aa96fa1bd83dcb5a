"""oneDNN-packed weights swapped in from outside (cpu_inference.py): Hugging Face's logits through them, for our
model and for Hugging Face's own GPT-2; never a stale weight; the model exactly as before when the scope ends."""

import copy
from unittest import mock

import pytest
import torch

from minigpt.chat.engine import Engine, SamplingParams
from minigpt.interop.hf import hf_config_dict, to_hf_state_dict
from minigpt.model.cpu_inference import available, is_packed, prepacked
from minigpt.model.gpt import GPT, ModelConfig

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not available(), reason="no oneDNN on this machine: nothing is packed")

CFG = ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=1000)


def hf_model(cfg: ModelConfig) -> "transformers.GPT2LMHeadModel":
    data = hf_config_dict(cfg, bos_token_id=0, eos_token_id=0)
    data.pop("architectures")
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**data)).eval()


def pair() -> tuple[GPT, "transformers.GPT2LMHeadModel"]:
    torch.manual_seed(0)
    ours = GPT(CFG).eval()
    theirs = hf_model(CFG)
    theirs.load_state_dict(to_hf_state_dict(ours), strict=False)
    return ours, theirs


def assert_close_relative(ours: torch.Tensor, theirs: torch.Tensor, rel: float = 1e-5) -> None:
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() <= rel * scale, f"max difference {(ours - theirs).abs().max()} vs {scale}"


def layout(model: torch.nn.Module) -> dict:
    """Every module's class and attributes (by identity) and every parameter: what "exactly as before" compares."""
    return {name: (type(m), {k: id(v) for k, v in vars(m).items()}) for name, m in model.named_modules()} | \
        {name: id(p) for name, p in model.named_parameters()}


no_linear = mock.patch("torch.nn.functional.linear", side_effect=AssertionError("F.linear was called"))
no_gelu = mock.patch("torch.nn.functional.gelu", side_effect=AssertionError("GELU outside the matmul"))


def test_packed_weights_give_huggingface_logits_and_step_aside_when_stale():
    ours, theirs = pair()
    before = layout(ours)
    idx = torch.randint(0, CFG.vocab_size, (3, CFG.block_size))
    with prepacked(ours, min_weight=0):
        with torch.no_grad(), no_linear, no_gelu:  # every product, the head's too, goes through oneDNN; GELU inside
            packed_logits, _ = ours(idx)
        assert_close_relative(packed_logits, theirs(idx).logits.detach())

        # A weight changed in place (an optimizer step) makes its copy stale: it is dropped, the new weight is used.
        with torch.no_grad():
            ours.h[0].mlp.c_fc.weight.mul_(2.0)
            theirs.transformer.h[0].mlp.c_fc.weight.mul_(2.0)  # HF's Conv1D holds the transpose; doubling is the same
            changed, _ = ours(idx)
        assert not is_packed(ours.h[0].mlp.c_fc) and is_packed(ours.h[0].mlp.c_proj)
        assert_close_relative(changed, theirs(idx).logits.detach())

        # A copy made inside the scope computes with its own weights, packed nowhere; a scope of its own packs it
        # and leaves it clean.
        copied = copy.deepcopy(ours)
        assert not any(is_packed(m) for m in copied.modules()) and is_packed(ours.lm_head)
        with torch.no_grad():
            copied.h[1].mlp.c_proj.weight.zero_()
            assert_close_relative(ours(idx)[0], changed)
            with prepacked(copied, min_weight=0):
                assert is_packed(copied.lm_head)
                assert not torch.allclose(copied(idx)[0], changed)
        assert not any("forward" in vars(m) for m in copied.modules())

        # Another dtype is computed with the weights themselves; the moved weights' copies are stale.
        with torch.no_grad():
            double, _ = ours.double()(idx)
        assert_close_relative(double.float(), changed)
        assert not is_packed(ours.lm_head)
        ours.float()

        # With autograd on the copies are not used, gradients reach the weights, and every copy is dropped for the
        # rest of the scope: an optimizer step may follow.
        _, loss = ours(idx, targets=idx)
        loss.backward()
        assert ours.h[0].mlp.c_fc.weight.grad.abs().sum() > 0
        assert not any(is_packed(m) for m in ours.modules())
    assert layout(ours) == before  # exactly as before: the same modules, attributes and tensors


def test_training_inside_a_scope_never_meets_a_stale_copy():
    """Fused AdamW changes weights in place without advancing their version counter: the forward pass with
    autograd that precedes any step must drop the copies."""
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    idx = torch.randint(0, CFG.vocab_size, (2, 16))
    with prepacked(model, min_weight=0):
        version = model.lm_head.weight._version
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        _, loss = model(idx, targets=idx)
        loss.backward()
        optimizer.step()
        assert model.lm_head.weight._version == version  # the step left no trace
        model.eval()
        with torch.no_grad():
            inside, _ = model(idx)
    with torch.no_grad():
        assert_close_relative(inside, model(idx)[0])  # the updated weights, not the packed ones of before
    # Weights made under inference_mode have no version counter to tell a change by: they are not packed.
    with torch.inference_mode():
        frozen = GPT(CFG).eval()
    with prepacked(frozen, min_weight=0):
        assert not any(is_packed(m) for m in frozen.modules())


def test_huggingface_gpt2_gets_the_same_packing_and_generates_the_same_tokens():
    _, theirs = pair()
    idx = torch.randint(0, CFG.vocab_size, (2, 12))
    with torch.inference_mode():
        expected = theirs(idx).logits
        greedy = theirs.generate(idx, do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
    before = layout(theirs)
    gelu = type(theirs.transformer.h[0].mlp.act)
    with prepacked(theirs, min_weight=0), torch.inference_mode():
        assert all(is_packed(layer) for block in theirs.transformer.h
                   for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj))
        assert is_packed(theirs.lm_head)
        # Conv1D's own product (addmm), the head's F.linear and the separate GELU are never called
        with mock.patch("torch.addmm", side_effect=AssertionError("Conv1D's addmm was called")), no_linear, \
                mock.patch.object(gelu, "forward", side_effect=AssertionError("GELU outside the matmul")):
            assert_close_relative(theirs(idx).logits, expected)
            packed_greedy = theirs.generate(idx, do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
    assert torch.equal(packed_greedy, greedy)
    assert layout(theirs) == before


def test_engines_pack_for_their_lifetime_and_give_the_model_back_in_any_order():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=256, block_size=32, vocab_size=97)).eval()
    before = layout(model)
    big, small = model.h[0].mlp.c_fc, model.h[0].attn.c_proj  # 262,144 and 65,536 weights: the threshold between
    first, second = Engine(model), Engine(model)
    assert is_packed(big) and not is_packed(small)
    first.close()
    assert is_packed(big)  # the second engine still uses it
    assert second.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4, temperature=0))[0].tokens
    second.close()
    assert layout(model) == before
    with Engine(model) as engine:
        assert is_packed(big)
    assert layout(model) == before
    engine = Engine(model)
    del engine  # garbage collected: the packing goes with it
    assert layout(model) == before
    Engine(model, prepack=False)
    assert not is_packed(big)

