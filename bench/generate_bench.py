"""Generation speed: our engine against Hugging Face `generate`, same weights, same prompts, one run.

    python bench/generate_bench.py                    # GPT-2 124M shape, batch 1 and 8, on the CPU
    python bench/generate_bench.py --preset tiny --new-tokens 128

Both decode greedily with a KV cache for exactly --new-tokens tokens (no early stop) from prompts of uneven
lengths (Hugging Face left-pads them with an attention mask; our engine needs no padding). Weights are random
(GPT-2's trained weights are not available offline), which changes nothing about speed. The outputs are compared
token for token, and the table prints generated tokens per second (median of --repeats runs) for each and the
ratio ours / theirs. On x86 CPUs our engine multiplies by oneDNN-prepacked copies of the large weights
(cpu_inference.prepacked); the "default kernels" column runs the same engine on a copy of the model without them,
which separates what the kernels give from what the engine gives; and "HF + oneDNN" runs Hugging Face `generate` with
the same packing applied to its model (`prepacked` handles its Conv1D layers and fuses its tanh-GELU MLP the same
way), so "ours / HF + oneDNN" is the engine's own share: both multiply by the same kernels. Medians of --repeats
runs, bests beside them. Then milliseconds per step: ours, HF, and the matrix products alone (each block's linear
layers and the head for one decode step, no attention, norms, sampling or
Python around them) with oneDNN and with PyTorch's default kernels.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from minigpt.chat.engine import Engine, SamplingParams
from minigpt.interop.hf import hf_config_dict, to_hf_state_dict
from minigpt.model.cpu_inference import prepacked
from minigpt.model.gpt import GPT, ModelConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per configuration (the median is kept)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.preset)
    ours = GPT(cfg).eval()
    data = hf_config_dict(cfg, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    data.pop("architectures")
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(**data)).eval()
    theirs.load_state_dict(to_hf_state_dict(ours), strict=False)

    plain = copy.deepcopy(ours)  # the same weights, never prepacked
    theirs_packed = copy.deepcopy(theirs)
    generator = torch.Generator().manual_seed(1)
    with prepacked(theirs_packed):  # HF's model multiplying by the same oneDNN-packed weights as our engine
        rows = [measure(ours, plain, theirs, theirs_packed, batch, args, generator) for batch in args.batches]

    print(f"\nGreedy generation, {args.preset} shape ({ours.num_params() / 1e6:.1f}M parameters), "
          f"{args.new_tokens} new tokens, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print("tokens per second, median (best); ratios of medians (of bests)")
    print("| batch | ours | HF | HF + oneDNN | ours / HF | ours / HF + oneDNN (the engine's share) | "
          "ours, default kernels / HF | identical | ms/step: ours, HF, matmuls alone (oneDNN, default) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for batch, tps, same in rows:
        with prepacked(ours):  # the weights as our engine multiplies by them
            floor = matmul_floor_ms(ours, batch, args.repeats)
        plain_floor = matmul_floor_ms(plain, batch, args.repeats)
        med = {k: statistics.median(v) for k, v in tps.items()}
        best = {k: max(v) for k, v in tps.items()}
        ratio = lambda a, b, med=med, best=best: f"{med[a] / med[b]:.2f}x ({best[a] / best[b]:.2f}x)"  # noqa: E731
        print(f"| {batch} | {med['ours']:.1f} ({best['ours']:.1f}) | {med['theirs']:.1f} ({best['theirs']:.1f}) | "
              f"{med['theirs_packed']:.1f} ({best['theirs_packed']:.1f}) | {ratio('ours', 'theirs')} | "
              f"{ratio('ours', 'theirs_packed')} | {ratio('plain', 'theirs')} | {same}/{batch} | "
              f"{1000 * batch / med['ours']:.1f}, {1000 * batch / med['theirs']:.1f}, {floor:.1f}, "
              f"{plain_floor:.1f} |")


@torch.inference_mode()
def matmul_floor_ms(model: GPT, batch: int, repeats: int) -> float:
    """Milliseconds per decode step of the matrix products alone, as `model` computes them (oneDNN where its weights
    are prepacked): each block's four linear layers and the head, for `batch` rows, without attention, norms,
    sampling or any Python around them. An engine built on these kernels cannot decode faster than this."""
    x = torch.randn(batch, model.config.n_embd)
    wide = torch.randn(batch, 4 * model.config.n_embd)
    layers = [pair for blk in model.h
              for pair in ((x, blk.attn.c_attn), (x, blk.attn.c_proj), (x, blk.mlp.c_fc), (wide, blk.mlp.c_proj))]
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for _ in range(10):
            for inp, layer in layers:
                layer(inp)
            model.lm_head(x)
        times.append((time.perf_counter() - start) / 10)
    return 1000 * statistics.median(times[1:])


def measure(ours: GPT, plain: GPT, theirs, theirs_packed, batch: int, args: argparse.Namespace,
            generator: torch.Generator) -> tuple[int, dict[str, list[float]], int]:
    cfg = ours.config
    lengths = [16 + (37 * i) % 48 for i in range(batch)]  # uneven: 16..63 tokens
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    engine = Engine(ours, max_batch=batch)
    plain_engine = Engine(plain, max_batch=batch, prepack=False)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)

    def run_ours():
        return [c.tokens for c in engine.generate(prompts, params)]

    def run_plain():
        return [c.tokens for c in plain_engine.generate(prompts, params)]

    width = max(lengths)
    input_ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as decoder-only generation in transformers expects
        input_ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1

    def run_hf(model):
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                  pad_token_id=0, eos_token_id=None)
        return out[:, width:].tolist()

    order = [("ours", run_ours), ("plain", run_plain), ("theirs", lambda: run_hf(theirs)),
             ("theirs_packed", lambda: run_hf(theirs_packed))]
    for _, run in order:  # warm-up
        run()
    tps: dict[str, list[float]] = {name: [] for name, _ in order}
    outputs = {}
    for r in range(args.repeats):  # taking turns to go first, so that background noise hits all alike
        for name, run in order[r % len(order):] + order[:r % len(order)]:
            t0 = time.perf_counter()
            outputs[name] = run()
            tps[name].append(batch * args.new_tokens / (time.perf_counter() - t0))
    same = sum(len({str(out[i]) for out in outputs.values()}) == 1 for i in range(batch))
    return batch, tps, same


if __name__ == "__main__":
    main()
