"""Sharded data parallelism: FSDP2 (`torch.distributed.fsdp.fully_shard`), for models whose training state does not
fit on every GPU.

    torchrun --nproc_per_node 8 -m minigpt train --config gpt2-124m --model.preset gpt2-xl --parallel fsdp

Under DistributedDataParallel every process holds the whole model, its gradients and AdamW's two moments: 16 bytes
per parameter. `shard_model` gives each of N processes 1/N of them instead (each block is its own unit, the
embeddings and ln_f the root's): before a block computes, its weights are gathered from every process (in bf16 with
`--precision bf16`: the fp32 master weights stay sharded); after its backward pass its gradients are reduced and
scattered back, in fp32, so each process keeps the gradients of its own share. The optimizer is made from the
sharded model by optim.make_optimizer, like any other, and steps its share only.

The loop in train.py stays the same: `accumulation` replaces DistributedDataParallel's no_sync, `global_norm`
turns the clipped norm (a DTensor here) into a plain number, `gathered_copy` gives rank 0 a whole model for the
samples and benchmarks it alone computes, `lockstep` keeps evaluations in step. fp16's GradScaler needs nothing
more: DTensor reduces its overflow check over the shards (a max), so one overflowing shard skips the step on every
process (tests/test_fsdp.py). Checkpoints are sharded too (checkpoint_sharded.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist

from minigpt.model.gpt import GPT


def shard_model(model: GPT, precision: str, reshard: bool = True) -> GPT:
    """Shard `model` (on its device, every process holding the same weights) over all processes, in place.

    Each block is its own unit, gathered for its forward and backward pass only; the root holds the embeddings and
    ln_f (the tied head with them). `precision` bf16 or fp16: the gathered weights and their gradients are in that
    dtype (FSDP's MixedPrecisionPolicy, which replaces autocast here), the sharded master weights and the gradient
    reduction stay fp32. `reshard` False keeps each block gathered after its forward pass (no all-gather in the
    backward pass) and, with `accumulation`, through every micro-batch of a step.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    policy = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32) if half else MixedPrecisionPolicy()
    for block in model.h:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # the root: never resharded before its own backward pass
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


def accumulation(model: torch.nn.Module, reshard: bool) -> Callable[[bool], contextlib.AbstractContextManager]:
    """For train_step: `sync(last)` around each micro-batch's forward and backward pass.

    By default (`reshard`) every micro-batch reduce-scatters its gradients into the shards (memory stays 1/N);
    otherwise the micro-batches before the last keep their gradients unsharded (fp32) and their weights gathered,
    and the last reduces them once: one all-gather and one reduce-scatter per block per step, the traffic of
    DistributedDataParallel, for the memory of whole weights and gradients while the step lasts.
    """
    fsdp = getattr(model, "_orig_mod", model)

    @contextlib.contextmanager
    def sync(last: bool) -> Iterator[None]:
        if not reshard:
            fsdp.set_requires_gradient_sync(last)
            fsdp.set_reshard_after_backward(last)
        yield

    return sync


Batch = TypeVar("Batch")


def lockstep(batches: Iterable[Batch], model: torch.nn.Module, empty: Callable[[], Batch]) -> Iterator[Batch]:
    """Each process's evaluation batches, as they are; for a sharded model, followed by `empty()` ones (targets all
    -100: they add nothing) until every process has run out. A sharded forward pass needs every process, and the
    processes' shares of a split may differ by a batch: without this the longer one waits forever."""
    if not is_sharded(model):
        yield from batches
        return
    device = next(model.parameters()).device
    remaining = iter(batches)
    while True:
        batch = next(remaining, None)
        more = torch.tensor([float(batch is not None)], device=device)
        dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if not more.item():
            return
        yield batch if batch is not None else empty()


def global_norm(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_ over sharded gradients returns the global norm as a (replicated) DTensor: a plain tensor."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def gathered_copy(model: GPT, rank: int, needed: bool = True) -> GPT | None:
    """For what rank 0 computes alone (samples, benchmarks): `model` itself, or a whole copy of a sharded one on
    rank 0 (None elsewhere; and for nobody when not `needed`), since a sharded model computes only with every
    process taking part. Every process must call it. The copy holds fp32 weights on the model's device until it is
    dropped."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_sharded(model):
        return model
    if not needed:
        return None

    device = next(model.parameters()).device
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    with torch.device("meta"):
        copy = GPT(dataclasses.replace(model.config))
    copy.load_state_dict({k: v.to(device) for k, v in weights.items()}, assign=True)
    copy.lm_head.weight = copy.wte.weight  # assign=True replaced the parameters: tie them again
    return copy.train(model.training)
