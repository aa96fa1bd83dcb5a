"""What a training run costs, from its settings alone: GPUs, FLOPs, memory per GPU, speed, time, disk, loss.

The arithmetic behind `minigpt plan` (plan.py) and `train --dry-run` (plan/dry_run.py), so the two never disagree:
    estimate_run(model_config, seq_len=, micro_batch=, grad_accum=, world=, steps=, precision=, gpu=, mfu=,
                 checkpointing=, keep_checkpoints=, loss_chunk_rows=0) -> RunEstimate
    training_memory(...) -> MemoryEstimate          largest_micro_batch(...) -> int | None
    gpu_for_device(torch.cuda.get_device_name()) -> GPUSpec | None
    precision_for_capability(torch.cuda.get_device_capability()) -> "bf16" | "fp16"
docs/plan.md derives and sources every number.
"""

from __future__ import annotations

import dataclasses
import math
import re

from minigpt.common import UserError
from minigpt.model.gpt import ModelConfig

GiB = 2**30

# ----------------------------------------------------------------------------------------------------------------
# GPUs (docs/plan.md sources each figure)


@dataclasses.dataclass(frozen=True)
class GPUSpec:
    key: str  # what --gpu takes
    name: str
    peak_flops: float  # dense (no 2:4 sparsity) tensor-core FLOP/s in bf16, or fp16 on cards without bf16
    memory_bytes: int  # replace it with torch.cuda.get_device_properties().total_memory on a real device
    capability: tuple[int, int]  # CUDA compute capability
    measured_mfu: float | None = None  # bench/gpu_session.sh's figure for this card, once measured

    @property
    def precision(self) -> str:
        return precision_for_capability(self.capability)

    @property
    def usable_bytes(self) -> int:
        """What a run may plan to allocate: 1 GiB for the CUDA context and library workspaces (outside torch's
        allocator), then 10% of the rest for the caching allocator's fragmentation."""
        return int(0.9 * (self.memory_bytes - GiB))


GPUS = {spec.key: spec for spec in [
    GPUSpec("A100-40GB", "NVIDIA A100 40GB", 312e12, 40 * GiB, (8, 0)),
    GPUSpec("A100-80GB", "NVIDIA A100 80GB", 312e12, 80 * GiB, (8, 0)),
    GPUSpec("H100-SXM", "NVIDIA H100 SXM 80GB", 989e12, 80 * GiB, (9, 0)),
    GPUSpec("H100-PCIe", "NVIDIA H100 PCIe 80GB", 756e12, 80 * GiB, (9, 0)),
    GPUSpec("H100-NVL", "NVIDIA H100 NVL 94GB", 835e12, 94 * GiB, (9, 0)),
    GPUSpec("H200", "NVIDIA H200 141GB", 989e12, 141 * GiB, (9, 0)),
    GPUSpec("GH200-96GB", "NVIDIA GH200 96GB HBM3", 989e12, 96 * GiB, (9, 0)),
    GPUSpec("GH200-144GB", "NVIDIA GH200 144GB HBM3e", 989e12, 144 * GiB, (9, 0)),
    GPUSpec("L4", "NVIDIA L4 24GB", 121e12, 24 * GiB, (8, 9)),
    GPUSpec("L40S", "NVIDIA L40S 48GB", 362e12, 48 * GiB, (8, 9)),
    GPUSpec("A10G", "NVIDIA A10G 24GB", 70e12, 24 * GiB, (8, 6)),
    GPUSpec("RTX-4090", "NVIDIA GeForce RTX 4090 24GB", 165e12, 24 * GiB, (8, 9)),
    GPUSpec("RTX-3090", "NVIDIA GeForce RTX 3090 24GB", 71e12, 24 * GiB, (8, 6)),
    GPUSpec("T4", "NVIDIA T4 16GB", 65e12, 16 * GiB, (7, 5)),
    GPUSpec("V100-16GB", "NVIDIA V100 SXM2 16GB", 125e12, 16 * GiB, (7, 0)),
    GPUSpec("V100-32GB", "NVIDIA V100 SXM2 32GB", 125e12, 32 * GiB, (7, 0)),
]}

# The strings cards really report (torch.cuda.get_device_name(), nvidia-smi) -> key. The GH200 reports its module's
# memory (480 GB: 96 GB of HBM3 plus 384 GB of CPU memory); the 144 GB HBM3e module reports its GPU memory.
REPORTED_NAMES = {
    "NVIDIA A100-SXM4-40GB": "A100-40GB", "NVIDIA A100-PCIE-40GB": "A100-40GB", "NVIDIA A100-SXM4-80GB": "A100-80GB",
    "NVIDIA A100 80GB PCIe": "A100-80GB", "NVIDIA A100-SXM-80GB": "A100-80GB", "NVIDIA H100 80GB HBM3": "H100-SXM",
    "NVIDIA H100 PCIe": "H100-PCIe", "NVIDIA H100 NVL": "H100-NVL", "NVIDIA H200": "H200",
    "NVIDIA GH200 480GB": "GH200-96GB", "NVIDIA GH200 144G HBM3e": "GH200-144GB", "NVIDIA L4": "L4",
    "NVIDIA L40S": "L40S", "NVIDIA A10G": "A10G", "NVIDIA GeForce RTX 4090": "RTX-4090",
    "NVIDIA GeForce RTX 3090": "RTX-3090", "Tesla T4": "T4", "Tesla V100-SXM2-16GB": "V100-16GB",
    "Tesla V100-SXM2-32GB": "V100-32GB", "Tesla V100-PCIE-16GB": "V100-16GB", "Tesla V100-PCIE-32GB": "V100-32GB",
}
# Short names people type -> every key they may mean; more than one is ambiguous and refused, listing them.
SHORT_NAMES = {
    "A100": ["A100-40GB", "A100-80GB"], "H100": ["H100-SXM", "H100-PCIe", "H100-NVL"],
    "H100-80GB": ["H100-SXM", "H100-PCIe"], "H100-94GB": ["H100-NVL"], "H100-SXM5": ["H100-SXM"],
    "H200-141GB": ["H200"], "GH200": ["GH200-96GB", "GH200-144GB"], "V100": ["V100-16GB", "V100-32GB"],
    "RTX4090": ["RTX-4090"], "4090": ["RTX-4090"], "RTX3090": ["RTX-3090"], "3090": ["RTX-3090"],
}


def _norm(name: str) -> str:
    """Case, spaces, dashes and the maker's words do not matter: "nvidia a100-sxm4-40gb" == "A100 SXM4 40GB"."""
    words = re.findall(r"[a-z0-9]+", name.lower())
    return "".join(w for w in words if w not in ("nvidia", "tesla", "geforce"))


_MATCHES: dict[str, list[str]] = {
    **{_norm(k): [k] for k in GPUS}, **{_norm(n): [k] for n, k in REPORTED_NAMES.items()},
    **{_norm(n): keys for n, keys in SHORT_NAMES.items()}}


def gpu_candidates(name: str) -> list[str]:
    """The keys `name` may mean: a key, a reported name or a short name exactly (ignoring case and separators); else
    the cards of a family named as a word in it (H100, A100, GH200, ...), narrowed by a size in GB where it gives
    one. Never a guess between sizes: several keys mean the name is ambiguous."""
    exact = _MATCHES.get(_norm(name))
    if exact:
        return exact
    words = re.findall(r"[a-z0-9]+", name.lower())
    family = next((_MATCHES[w] for w in words if w in _MATCHES and len(_MATCHES[w]) > 1), None)
    if family is None:
        return []
    sizes = {int(m) for w in words for m in re.findall(r"^(\d+)gb?$", w)}
    sized = [k for k in family if GPUS[k].memory_bytes // GiB in sizes]
    return sized or family


def gpu_for_device(device_name: str) -> GPUSpec | None:
    """The table's entry for a `torch.cuda.get_device_name()` string, or None for a card it does not know (or cannot
    tell from its name alone)."""
    keys = gpu_candidates(device_name)
    return GPUS[keys[0]] if len(keys) == 1 else None


def find_gpu(name: str) -> GPUSpec:
    """--gpu: a table key, a name as cards report it or a short name (any case); ambiguous names are refused."""
    keys = gpu_candidates(name)
    if len(keys) > 1:
        which = ", ".join(f"{k} ({GPUS[k].memory_bytes // GiB} GB, {GPUS[k].peak_flops / 1e12:.0f} TFLOP/s)"
                          for k in keys)
        raise UserError(f"--gpu {name!r} could be {which}: name one of them")
    if not keys:
        raise UserError(f"unknown GPU {name!r}: use one of {', '.join(GPUS)}, or the name the card reports "
                        "(nvidia-smi -L)")
    return GPUS[keys[0]]


def precision_for_capability(capability: tuple[int, int]) -> str:
    """bf16 where the card computes it natively (compute capability 8.0 and up: Ampere, Ada, Hopper), fp16 with
    loss scaling below (V100 7.0, T4 7.5), where bf16 is emulated far below the tensor cores' speed."""
    return "bf16" if tuple(capability) >= (8, 0) else "fp16"


# ----------------------------------------------------------------------------------------------------------------
# Size and FLOPs from the shape alone (tests hold them equal to GPT's own counts)


def block_params(cfg: ModelConfig) -> int:
    """One block: four weight matrices, 12 C^2, their biases (9 C) and two LayerNorms (4 C; 2 C without bias)."""
    return 12 * cfg.n_embd**2 + (13 if cfg.bias else 2) * cfg.n_embd


def stored_params(cfg: ModelConfig) -> int:
    """Parameters as tensors in memory: the embedding with its padding rows, the tied head once."""
    C = cfg.n_embd
    return (cfg.padded_vocab_size + cfg.block_size) * C + cfg.n_layer * block_params(cfg) + (2 if cfg.bias else 1) * C


def num_params(cfg: ModelConfig) -> int:
    """GPT-2's count, as GPT.num_params: without the vocabulary padding."""
    return stored_params(cfg) - (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token, 6N + 12 L C T, as GPT.flops_per_token (N without the position embedding)."""
    return 6 * (num_params(cfg) - cfg.block_size * cfg.n_embd) + 12 * cfg.n_layer * cfg.n_embd * seq_len


def muon_matrix_params(cfg: ModelConfig) -> int:
    """The weights --optimizer muon steps with Muon (train.py's default muon_params): the blocks' four matrices."""
    return 12 * cfg.n_embd**2 * cfg.n_layer


def optimizer_bytes(cfg: ModelConfig, optimizer: str = "adamw") -> int:
    """The optimizer's state, fp32: AdamW keeps two moments per parameter; Muon one momentum per matrix entry."""
    params = stored_params(cfg)
    return 8 * params if optimizer == "adamw" else 8 * (params - muon_matrix_params(cfg)) + 4 * muon_matrix_params(cfg)


def newton_schulz_flops(cfg: ModelConfig, steps: int = 5) -> int:
    """Muon's Newton-Schulz per optimizer step, every GPU (each orthogonalises every whole matrix: DDP's gradients
    are all-reduced first, FSDP gathers them). Per iteration on an m x n matrix, m <= n: X X^T (2 m^2 n), its
    square (2 m^3), that times X (2 m^2 n). A block's matrices, C x 3C, C x C, C x 4C twice: 56 C^3 per iteration."""
    C = cfg.n_embd
    sides = [(C, 3 * C), (C, C), (C, 4 * C), (C, 4 * C)]
    return steps * cfg.n_layer * sum(4 * m * m * n + 2 * m**3 for m, n in sides)


def recompute_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """What gradient checkpointing adds: one more forward pass of the blocks, 2 x 12 C^2 L + 4 L C T."""
    return 24 * cfg.n_embd**2 * cfg.n_layer + 4 * cfg.n_layer * cfg.n_embd * seq_len


# ----------------------------------------------------------------------------------------------------------------
# Memory of a training step, per GPU (docs/plan.md derives each term; tests measure them on the CPU)


@dataclasses.dataclass
class MemoryEstimate:
    """Bytes alive at the step's peak, by kind, and the moment of the step where the peak falls."""

    weights: int  # fp32 master weights
    gradients: int  # fp32, those that exist at the peak
    optimizer: int  # fp32: AdamW's two moments per parameter; with Muon one momentum for its matrices
    weight_copies: int  # autocast's bf16/fp16 copies of the matmul weights alive at the peak
    batch: int  # the step's token ids and targets (int64), all micro-batches at once as train.py takes them
    activations: int  # tensors the forward pass keeps for the backward pass, alive at the peak
    temporaries: int  # short-lived tensors at the peak: logits chunks, the loss's gradients, a block's gradients
    phase: str
    total: int = dataclasses.field(init=False)  # the peak: the sum of the above

    def __post_init__(self) -> None:
        self.total = (self.weights + self.gradients + self.optimizer + self.weight_copies + self.batch
                      + self.activations + self.temporaries)


def training_memory(cfg: ModelConfig, *, micro_batch: int, seq_len: int, precision: str, checkpointing: bool,
                    grad_accum: int = 1, loss_chunk_rows: int = 0, shards: int = 0,
                    optimizer: str = "adamw") -> MemoryEstimate:
    """Peak memory of one training step of train.py: fp32 weights, AdamW, fused attention, dropout off.

    `precision` is fp32, bf16 or fp16 (autocast). `loss_chunk_rows` > 0 is the chunked head and loss (train.py's
    default on CPUs), 0 the plain one (its default on GPUs), both eager: torch.compile usually needs less. The
    peak is the largest of the step's high points: the end of the forward pass; the backward pass at the loss;
    the backward pass through the blocks, last to first, as the blocks' activations are freed and their gradients
    made (so at one end); the end of the backward pass, where the tied embedding's two gradients are summed.
    `shards` > 0: FSDP over that many GPUs (`sharded_memory`).
    """
    C, L, H, V, Vp = cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.vocab_size, cfg.padded_vocab_size
    tok = micro_batch * seq_len
    a = 4 if precision == "fp32" else 2  # bytes per value of a matmul's input or output
    P, g, wte = stored_params(cfg), 4 * block_params(cfg), 4 * Vp * C  # g, wte: a block's, the embedding's grads
    state = dict(weights=4 * P, optimizer=optimizer_bytes(cfg, optimizer), batch=16 * tok * grad_accum)
    # autocast's copies of the matmul weights: cached until the forward pass leaves autocast, then kept by the
    # matmuls that saved them for the backward pass (in a checkpointed block none: it remakes its own in turn);
    # the chunked loss casts a slice of the head for each chunk instead, a temporary
    head_copy = 0 if loss_chunk_rows else Vp * C
    copies = 0 if a == 4 else 2 * (12 * C * C * L + head_copy)
    copies_kept = 0 if a == 4 else 2 * (12 * C * C + head_copy) if checkpointing else copies
    # per token a block keeps ln_1's and ln_2's inputs (fp32) with their means and 1/stds, c_attn's input, q k v
    # and the attention output, one log-sum-exp per head (fp32), c_fc's input, GELU's input and output
    block = tok * (2 * (4 * C + 8) + a * 14 * C + 4 * H)
    kept = 4 * C * tok if checkpointing else block  # a block not being worked on keeps its input, or everything
    if loss_chunk_rows:  # ln_f's input, and the gradients of the hidden states and of the head (made forward)
        head = tok * (4 * C + 8 + 4 * C) + wte
        # the hidden states, and a chunk's float32 logits with two temporaries of its log-sum-exp, or (autocast)
        # with the half-precision cast of the head and of the chunk's gradient, if that is more
        chunk = min(loss_chunk_rows, tok) * V
        head_forward = tok * 4 * C + 4 * chunk + max(8 * chunk, 0 if a == 4 else 2 * chunk + 2 * V * C)
        head_backward = tok * 4 * C + wte  # both gradients scaled by the incoming one
        embedding_sum = 2 * wte  # the head's gradient and the lookup's, summed in place
    else:  # ln_f's input, the head's input, the log-probabilities (train.py's loop keeps no logits)
        head = tok * (4 * C + 8 + a * C + 4 * V)
        # the logits, and their float32 copy the loss is computed on (autocast)
        head_forward = a * Vp * tok + (0 if a == 4 else tok * 4 * V)
        head_backward = tok * 8 * V  # the loss's gradient and the log-softmax's, float32
        # the head's gradient and the lookup's; in fp32 the head's is a transposed view, so their sum is a third
        embedding_sum = (3 if a == 4 else 2) * wte
    block_backward = tok * (4 * C + 4 * C * a)  # the residual stream's gradient and one 4C-wide gradient

    def at(phase: str, copies: int, gradients: int, activations: int, temporaries: int) -> MemoryEstimate:
        return MemoryEstimate(weight_copies=copies, gradients=gradients, activations=activations,
                              temporaries=temporaries, phase=phase, **state)

    if grad_accum > 1:  # from the second micro-batch of a step on, every gradient exists
        before, last_block, first_block, tied = 4 * P, 4 * P, 4 * P, 4 * P
    else:  # the head's and embedding's gradients come first; the blocks' one by one; the lookup's last
        before, last_block, first_block, tied = 0, 4 * P - L * g, 4 * P - g, 4 * P - wte
    phases = [at("end of the forward pass", copies, before, L * kept + head, head_forward),
              at("backward pass at the loss", copies_kept, before, L * kept + head, head_backward),
              at("backward pass, last block", copies_kept, last_block, (L - 1) * kept + block, block_backward),
              at("backward pass, first block", copies_kept, first_block, block, block_backward),
              at("end of the backward pass (tied embedding)", 0, tied, 0, embedding_sum)]
    if shards:
        phases = [sharded_memory(m, cfg, shards, precision) for m in phases]
    return max(phases, key=lambda m: m.total)


def sharded_memory(m: MemoryEstimate, cfg: ModelConfig, shards: int, precision: str) -> MemoryEstimate:
    """One moment `m` of a step of train.py, under FSDP over `shards` GPUs (runs/parallel.py, default resharding).

    Each GPU keeps 1/N of the fp32 weights, of the optimizer's state and of the gradients that exist at that moment.
    Gathered for computing, in the policy's dtype (bf16/fp16, fp32 with --precision fp32): the root's weights
    (embeddings, ln_f) through the whole step, and the block computing with the next one (prefetched) - autocast's
    weight copies are gone, FSDP's policy computes in that dtype. A block's backward pass adds its gradients,
    unsharded, and their fp32 copy for the reduce-scatter; the end of the backward pass the root's (the tied
    embedding's two). Activations and the other temporaries are autocast's: an upper bound, the policy keeping
    the LayerNorms' inputs in 16 bits where autocast keeps them in 32.
    """
    p = 4 if precision == "fp32" else 2
    unit, params = block_params(cfg), stored_params(cfg)
    root = params - cfg.n_layer * unit
    temporaries, gathered = m.temporaries, p * (root + 2 * unit)
    if m.phase.startswith("backward pass,"):
        temporaries += (p + 4) * unit
    elif m.phase.startswith("end of the backward"):
        temporaries, gathered = (2 * p + 4) * root, p * root
    return MemoryEstimate(weights=-(-4 * params // shards), gradients=-(-m.gradients // shards),
                          optimizer=-(-m.optimizer // shards), weight_copies=gathered, batch=m.batch,
                          activations=m.activations, temporaries=temporaries, phase=m.phase)


# ----------------------------------------------------------------------------------------------------------------
# Speed, and the loss a size and a length of training should reach

# llm.c PR #323: PyTorch (bf16, torch.compile, flash attention) trains GPT-2 124M at 115k tokens/s on one A100
# 40GB PCIe: 115e3 x 855.2 MFLOP per token / 312 TFLOP/s = 31.5% MFU. There is no GPU figure of ours yet.
ASSUMED_MFU = 0.315
ASSUMED_MFU_SOURCE = "assumed from 115k tok/s for GPT-2 124M on an A100 40GB, PyTorch + compile (llm.c PR #323)"


def default_mfu(gpu: GPUSpec) -> tuple[float, str]:
    if gpu.measured_mfu is not None:
        return gpu.measured_mfu, f"measured on {gpu.name} (docs/benchmarks.md)"
    return ASSUMED_MFU, ASSUMED_MFU_SOURCE


# Hoffmann et al. 2022 (Chinchilla), eq. 10 (approach 3): L(N, D) = E + A / N^alpha + B / D^beta for N parameters
# trained on D tokens; compute-optimal training takes about 20 tokens per parameter (approaches 1 and 2).
CHINCHILLA = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
OPTIMAL_TOKENS_PER_PARAM = 20
# The fit's nats are those of Chinchilla's tokenizer and data, so it is shifted onto a run like ours: llm.c's
# GPT-2 124M (124,439,808 parameters), 18,865 steps x 524,288 FineWeb tokens, 3.2847 on FineWeb's validation
# (as modded-nanogpt's first README quotes it).
ANCHOR = dict(params=124_439_808, tokens=18_865 * 524_288, loss=3.2847)


def chinchilla_loss(params: float, tokens: float) -> float:
    c = CHINCHILLA
    return c["E"] + c["A"] / params ** c["alpha"] + c["B"] / tokens ** c["beta"]


# Muennighoff et al. 2023 ("Scaling Data-Constrained Language Models", eq. 5): D tokens drawn from U unique ones
# are worth U + U R* (1 - exp(-R / R*)) fresh tokens, R = D / U - 1 repetitions, R* = 15.4 fitted: ~4 epochs are
# nearly as good as fresh data, and past ~16 more passes add almost nothing.
REPEAT_DECAY = 15.4


def effective_tokens(tokens: float, unique_tokens: float | None) -> float:
    """What `tokens` of training on `unique_tokens` of data are worth in fresh tokens (data-constrained scaling)."""
    if not unique_tokens or tokens <= unique_tokens:
        return tokens
    repeats = tokens / unique_tokens - 1
    return unique_tokens + unique_tokens * REPEAT_DECAY * (1 - math.exp(-repeats / REPEAT_DECAY))


def expected_loss(params: float, tokens: float, unique_tokens: float | None = None,
                  vocab_size: int | None = None) -> float:
    """The validation loss the anchored fit expects of `params` trained on `tokens` (of `unique_tokens` of data, if
    given: repeats count for less): an estimate, see docs. Never above ln(vocab_size), the loss of a uniform guess,
    which the fit exceeds for tiny token counts it was never meant for."""
    tokens = effective_tokens(tokens, unique_tokens)
    loss = chinchilla_loss(params, tokens) + ANCHOR["loss"] - chinchilla_loss(ANCHOR["params"], ANCHOR["tokens"])
    return min(loss, math.log(vocab_size)) if vocab_size else loss


def compute_optimal_params(flops: float) -> float:
    """N for C = 6 N D at D = 20 N: N = sqrt(C / 120)."""
    return math.sqrt(flops / (6 * OPTIMAL_TOKENS_PER_PARAM))


def depth_shape(depth: int, block_size: int, vocab_size: int) -> ModelConfig:
    """GPT-2's proportions on one dial: `depth` blocks of width 64 x depth in heads of 64 (depth 12 is gpt2)."""
    return ModelConfig(n_layer=depth, n_head=depth, n_embd=64 * depth, block_size=block_size, vocab_size=vocab_size)


def shape_near(params: float, block_size: int, vocab_size: int) -> ModelConfig:
    """The depth_shape whose parameter count is nearest `params`, on a log scale."""
    return min((depth_shape(d, block_size, vocab_size) for d in range(1, 97)),
               key=lambda cfg: abs(math.log(num_params(cfg) / params)))


# Muon's token efficiency: AdamW's tokens to reach a loss / Muon's tokens to reach the same loss. The plan takes the
# smallest of these (docs/plan.md): what we measured at small scale and what public sources report.
MEASURED_TOKEN_EFFICIENCY = 1.55  # bench/optimizer_search.py: the quickstart's model, 2 seeds (docs/training.md)
TOKEN_EFFICIENCY = {
    "measured: bench/optimizer_search.py at small scale on CPUs (docs/training.md)": MEASURED_TOKEN_EFFICIENCY,
    # the README of the release that brought Muon into the speedrun (October 2024): "1.36x faster training" than
    # a well-tuned AdamW, 3.67B tokens to llm.c's 3.28 on GPT-2 124M (its AdamW record before it: 5B)
    "modded-nanogpt (K. Jordan, 2024): 1.36x vs tuned AdamW, GPT-2 124M on FineWeb": 1.36,
    # Liu et al. 2025, "Muon is Scalable for LLM Training" (arXiv:2502.16982): scaling-law fits up to 1.5B
    # parameters, Muon at about half of AdamW's training FLOPs for the same loss
    "Moonlight (Liu et al. 2025, arXiv:2502.16982): ~2x compute efficiency": 2.0,
}


def token_efficiency() -> tuple[float, str]:
    """The factor the plan gives Muon (the smallest in TOKEN_EFFICIENCY) and where it comes from."""
    source = min(TOKEN_EFFICIENCY, key=TOKEN_EFFICIENCY.get)
    return TOKEN_EFFICIENCY[source], source


# GPT-3's peak learning rates by size (Brown et al. 2020, table 2.1); the recipe's 6e-4 is the 125M row
GPT3_LR = [(125e6, 6e-4), (350e6, 3e-4), (760e6, 2.5e-4), (1.3e9, 2e-4), (2.7e9, 1.6e-4), (6.7e9, 1.2e-4)]


def learning_rate_for(params: float) -> float:
    return min(GPT3_LR, key=lambda row: abs(math.log(row[0] / params)))[1]


# ----------------------------------------------------------------------------------------------------------------
# One run


@dataclasses.dataclass
class RunEstimate:
    params: int  # GPT-2's count
    flops_per_token: int  # model FLOPs, which MFU counts; checkpointing's recomputation comes on top
    recompute_flops_per_token: int  # 0 without checkpointing
    seq_len: int
    micro_batch: int
    grad_accum: int
    world: int
    tokens_per_step: int
    steps: int
    total_tokens: int
    precision: str
    checkpointing: bool
    memory: MemoryEstimate  # per GPU
    usable_bytes: int | None  # per GPU; these four are None without a GPU
    fits: bool | None
    tokens_per_s: float | None  # all GPUs together
    hours: float | None  # training alone
    mfu: float | None
    mfu_source: str
    checkpoint_bytes: int  # one checkpoint: model.safetensors + trainer.pt
    checkpoint_disk_bytes: int  # the most on disk at once: the newest kept, the best, the one being written
    expected_loss: float
    parallel: str = "ddp"  # ddp: every GPU holds the whole training state; fsdp: 1/world of it (runs/parallel.py)
    optimizer: str = "adamw"
    newton_schulz_flops: int = 0  # per optimizer step, on every GPU (muon)
    adamw_expected_loss: float = 0.0  # the same tokens with AdamW (equal to expected_loss for adamw)


def estimate_run(model: ModelConfig, *, seq_len: int, micro_batch: int, grad_accum: int, world: int, steps: int,
                 precision: str, gpu: GPUSpec | None, mfu: float | None, checkpointing: bool,
                 keep_checkpoints: int, loss_chunk_rows: int = 0, parallel: str = "ddp",
                 optimizer: str = "adamw", unique_tokens: float | None = None) -> RunEstimate:
    """Everything that follows from a run's settings: size, FLOPs, memory per GPU, speed, time, disk, loss.

    Without a GPU (gpu=None) there is no fit, speed or time; mfu=None takes the card's default (default_mfu).
    Tokens/s = MFU x peak x GPUs / (FLOPs per token + recomputation): checkpointing costs time at the same
    utilisation (FSDP's gathers are assumed hidden behind compute, as they are within a node). Muon adds its
    Newton-Schulz FLOPs to every GPU's step at the same utilisation, and its loss is AdamW's with the tokens
    multiplied by `token_efficiency()`; tokens past `unique_tokens` of data are repeats and count for less (both
    losses). Checkpoints hold the fp32 weights and the optimizer's state: 12 bytes per
    stored parameter with AdamW, 8 for Muon's matrices (under FSDP 1/world of them per GPU).
    """
    if seq_len > model.block_size:
        raise UserError(f"seq_len {seq_len} exceeds the model's context window {model.block_size}")
    fpt, extra = flops_per_token(model, seq_len), recompute_flops_per_token(model, seq_len) if checkpointing else 0
    memory = training_memory(model, micro_batch=micro_batch, seq_len=seq_len, precision=precision,
                             checkpointing=checkpointing, grad_accum=grad_accum, loss_chunk_rows=loss_chunk_rows,
                             shards=world if parallel == "fsdp" and world > 1 else 0, optimizer=optimizer)
    ns = newton_schulz_flops(model) if optimizer == "muon" else 0
    tokens_per_step = micro_batch * seq_len * grad_accum * world
    usable = fits = tokens_per_s = hours = None
    source = "given" if mfu is not None else "no GPU"
    if gpu is not None:
        usable, fits = gpu.usable_bytes, memory.total <= gpu.usable_bytes
        if mfu is None:
            mfu, source = default_mfu(gpu)
        step_seconds = ((fpt + extra) * tokens_per_step / world + ns) / (mfu * gpu.peak_flops)
        tokens_per_s = tokens_per_step / step_seconds
        hours = steps * tokens_per_step / tokens_per_s / 3600
    # (plus a few KB: steps, scaler, RNG states, data position, headers)
    checkpoint = 4 * stored_params(model) + optimizer_bytes(model, optimizer)
    tokens, factor = steps * tokens_per_step, token_efficiency()[0] if optimizer == "muon" else 1.0
    seen = effective_tokens(tokens, unique_tokens)  # repeats of `unique_tokens` of data count for less
    return RunEstimate(num_params(model), fpt, extra, seq_len, micro_batch, grad_accum, world, tokens_per_step,
                       steps, tokens, precision, checkpointing, memory, usable, fits, tokens_per_s,
                       hours, mfu, source, checkpoint, (keep_checkpoints + 2) * checkpoint,
                       expected_loss(num_params(model), seen * factor, vocab_size=model.vocab_size), parallel,
                       optimizer, ns, expected_loss(num_params(model), seen, vocab_size=model.vocab_size))


def largest_micro_batch(model: ModelConfig, *, seq_len: int, tokens_per_step: int, world: int, precision: str,
                        gpu: GPUSpec, checkpointing: bool, loss_chunk_rows: int = 0, parallel: str = "ddp",
                        optimizer: str = "adamw") -> int | None:
    """The largest micro-batch (sequences per GPU) that divides a step evenly and fits the card, or None."""
    per_gpu, rest = divmod(tokens_per_step, seq_len * world)
    if rest or not per_gpu:
        near = max(seq_len * world, round(tokens_per_step / (seq_len * world)) * seq_len * world)
        raise UserError(f"{tokens_per_step} tokens per step is not a multiple of seq_len x GPUs = {seq_len * world}: "
                        f"the nearest that is, --batch-tokens {near}")
    for micro in (b for b in range(per_gpu, 0, -1) if per_gpu % b == 0):
        memory = training_memory(model, micro_batch=micro, seq_len=seq_len, precision=precision,
                                 checkpointing=checkpointing, grad_accum=per_gpu // micro,
                                 loss_chunk_rows=loss_chunk_rows, shards=world if parallel == "fsdp" else 0,
                                 optimizer=optimizer)
        if memory.total <= gpu.usable_bytes:
            return micro
    return None
