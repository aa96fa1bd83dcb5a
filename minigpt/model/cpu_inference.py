"""Faster inference on x86 CPUs: linear layers multiply by oneDNN-prepacked weights, swapped in from outside.

    from minigpt.model.cpu_inference import prepacked

    with prepacked(model):                       # minigpt's GPT, Hugging Face's GPT2LMHeadModel, any nn.Module
        model(idx)                               # or model.generate(...): the large products go through oneDNN
    # here the model is exactly as before: no attribute, no copy, nothing left behind

Why. Decoding multiplies a few rows by each large weight, and PyTorch's default CPU matmul (MKL) does that far
below the memory bandwidth; oneDNN, with the weight reordered once into its blocked layout, does the same product
1.3-4x faster (docs/benchmarks.md, bench/generate_bench.py). Inside the `with`, each linear layer of at least
`min_weight` elements gets a reordered copy of its weight (as much memory again) and a replacement `forward`, an
attribute on that module instance that shadows its class's; an MLP of the GPT-2 kind also gets one, which applies
GELU(tanh) inside c_fc's matmul. Leaving the `with` deletes them. The layers it knows: `nn.Linear` (weight
(out, in)) and Hugging Face's `Conv1D` (weight (in, out)); the MLPs: minigpt's and Hugging Face's GPT-2 MLP with a
tanh GELU. Nothing happens off x86-64, without oneDNN, or for weights that are not float32 on the CPU.

The invariants (no other module needs to know them):
1. A packed copy stands in for its weight only where it gives the weight's own result: a float32 input, autograd
   and autocast off, the module in eval mode, and the weight the same tensor as when packed, unchanged in place
   since (its version counter) and not moved (its storage). Anywhere else the module's own forward runs.
2. A call with autograd on drops the copy for the rest of the `with`: a gradient step may follow, and fused AdamW
   updates weights in place without advancing their version counter, so that change would go unseen. A stale
   copy is dropped too, freeing its memory. (Never train inside the `with`; this is the safety net.)
3. Weights made under inference_mode carry no version counter to tell a change by: they are left alone.
4. Scopes may overlap (two engines on one model): a layer's replacement counts the scopes using it, the first one
   packs, a later one re-packs a dropped copy, the last one out restores the layer, in any order.
5. A model copied or pickled inside the `with` carries no packed weights: its layers compute with their own
   (through replacements holding nothing, which a `prepacked` scope of the copy takes over and then removes).
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator

import torch
import torch.nn as nn

from minigpt.model.gpt import MLP

MIN_WEIGHT = 1 << 17  # below ~128K elements oneDNN's fixed cost per call (~15 us) outweighs what it saves

# The activations Hugging Face names for GELU with the tanh approximation (GPT-2's "gelu_new").
_HF_TANH_GELU = ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh")


def available() -> bool:
    """Whether this machine packs at all: an x86-64 CPU and a PyTorch built with oneDNN's linear ops."""
    return (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@contextlib.contextmanager
def prepacked(model: nn.Module, min_weight: int = MIN_WEIGHT) -> Iterator[nn.Module]:
    """Multiply by oneDNN-packed copies of the linear weights of at least `min_weight` elements inside the `with`.

    The default threshold suits decoding (a few rows per product); a pass over many rows (scoring) gains on every
    layer, so min_weight=0 there. Yields the model; every module is restored on exit.
    """
    swaps: list[_Swap] = []
    try:
        if available():
            linears = [m for m in model.modules() if _layout(m) is not None and _packable(m.weight, min_weight)]
            swaps += filter(None, map(_PackedLinear.enter, linears))
            mlps = [m for m in model.modules() if _tanh_gelu_mlp(m) and is_packed(m.c_fc)]
            swaps += filter(None, map(_FusedGeluMLP.enter, mlps))
        yield model
    finally:
        for swap in reversed(swaps):
            swap.leave()


def is_packed(module: nn.Module) -> bool:
    """Whether a linear layer holds a packed copy of its weight right now."""
    swap = module.__dict__.get("forward")
    return isinstance(swap, _PackedLinear) and swap.onednn is not None


def _layout(module: nn.Module) -> str | None:
    """"out, in" for nn.Linear, "in, out" for Hugging Face's Conv1D (GPT-2's layers there), None for others."""
    if isinstance(module, nn.Linear):
        return "out, in"
    if type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers"):
        return "in, out"
    return None


def _packable(weight: torch.Tensor, min_weight: int) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and weight.numel() >= min_weight and not weight.is_inference())


def _tanh_gelu_mlp(module: nn.Module) -> bool:
    """An MLP computing c_proj(GELU_tanh(c_fc(x))) (then dropout, off in eval mode): minigpt's, or GPT-2's in HF."""
    if isinstance(module, MLP):
        return True
    return (type(module).__name__ == "GPT2MLP" and type(getattr(module, "act", None)).__name__ in _HF_TANH_GELU
            and hasattr(module, "c_fc") and hasattr(module, "c_proj"))


class _Swap:
    """A replacement `forward` set on one module instance, shared by the scopes using it (`users`)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.original = type(module).forward.__get__(module)  # the class's own forward, bound to the module
        self.users = 0

    @classmethod
    def enter(cls, module: nn.Module) -> _Swap | None:
        """Join (or install) this module's replacement; None where another tool already replaced its forward."""
        swap = module.__dict__.get("forward")
        if swap is None:
            swap = cls(module)
            module.forward = swap  # an instance attribute: nn.Module.__call__ finds it before the class's forward
        elif not isinstance(swap, cls):
            return None
        swap.users += 1
        swap.prepare()
        return swap

    def leave(self) -> None:
        self.users -= 1
        if self.users <= 0 and self.module.__dict__.get("forward") is self:
            del self.module.forward

    def prepare(self) -> None:
        """Make what the fast path needs, where it is missing."""

    def __reduce__(self):  # noqa: ANN204
        # invariant 5: a copy of the module gets a replacement of its own with nothing packed (it runs the
        # module's own forward), which the copy's first `prepacked` scope takes over and its last one removes
        return type(self), (self.module,)


class _PackedLinear(_Swap):
    """x W^T + b through oneDNN's packed copy of W where invariant 1 allows, else the layer's own forward."""

    def __init__(self, module: nn.Module):
        super().__init__(module)
        self.weight = self.version = self.storage = self.onednn = self.op = None

    def prepare(self) -> None:
        if self.onednn is not None and self._fresh():
            return
        weight = self.module.weight
        w = weight.detach() if _layout(self.module) == "out, in" else weight.detach().t().contiguous()
        self.onednn = torch.ops.mkldnn._reorder_linear_weight(w)
        # Holding the weight also keeps its storage alive, so a new tensor can never reuse the address.
        self.weight, self.version, self.storage = weight, weight._version, weight.data_ptr()
        self.op = torch.ops.mkldnn._linear_pointwise.default

    def _fresh(self) -> bool:
        weight = self.module._parameters["weight"]
        return weight is self.weight and weight._version == self.version and weight.data_ptr() == self.storage

    def usable(self, x: torch.Tensor) -> bool:
        """Whether the packed copy may stand in for the weight on input x (invariants 1 and 2)."""
        if self.onednn is None:
            return False
        weight = self.module._parameters["weight"]  # (written out, not _fresh(): this runs ~50 times per token)
        if (torch.is_grad_enabled() or weight is not self.weight or weight._version != self.version
                or weight.data_ptr() != self.storage):
            self.onednn = None  # dropped for this scope; a later scope packs again
            return False
        return not self.module.training and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.usable(x):
            return self.op(x, self.onednn, self.module._parameters["bias"], "none", [], "")
        return self.original(x)


class _FusedGeluMLP(_Swap):
    """c_proj(GELU_tanh(c_fc(x))) with oneDNN applying the GELU inside c_fc's packed matmul (eval mode only)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.module
        c_fc = mlp._modules["c_fc"]  # (not mlp.c_fc: nn.Module's __getattr__ is slow, and this runs for every token)
        fc = c_fc.__dict__.get("forward")
        if isinstance(fc, _PackedLinear) and not mlp.training and fc.usable(x):
            h = fc.op(x, fc.onednn, c_fc._parameters["bias"], "gelu", [], "tanh")
            return mlp._modules["c_proj"](h)  # then dropout, the identity in eval mode
        return self.original(x)
