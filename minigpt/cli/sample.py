"""`minigpt sample`: continue a prompt with any run, streamed to the terminal."""

from __future__ import annotations

import dataclasses
import sys

from minigpt.chat.engine import Engine, SamplingParams, TextDecoder
from minigpt.common import UserError, pick_device
from minigpt.runs.loading import load_run
from minigpt.text.chat_format import (
    end_of_turn_ids,
    special_ids,
)


def add_arguments(parser) -> None:
    parser.add_argument("run", help="a run folder or checkpoint (pretrained or fine-tuned)")
    parser.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    parser.add_argument("--num-samples", type=int, default=1, help="continuations, decoded as one batch (default: 1)")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="(default: 100)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=50, help="0 = off (default: 50)")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off (default: 1.0)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    parser.add_argument("--checkpoint", default="latest", help="latest, best or a step_N folder name")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default: cpu)")


def main(args) -> None:
    """Stream one sample to the terminal as it is made; several are printed one after another."""
    if args.num_samples < 1 or args.max_new_tokens < 1:
        raise UserError("--num-samples and --max-new-tokens must be at least 1")
    try:
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    model, tokenizer, _ = load_run(args.run, pick_device(args.device), args.checkpoint)
    prompt = [tokenizer.eot_id] + tokenizer.encode_ordinary(args.prompt)  # a document starts after end-of-text
    prompt = prompt[-(model.config.block_size - 1):]
    params.stop_token_ids = end_of_turn_ids(tokenizer)
    engine = Engine(model, max_batch=args.num_samples, seed=args.seed)
    decoders = [TextDecoder(tokenizer.token_bytes, skip=special_ids(tokenizer)) for _ in range(args.num_samples)]
    if args.num_samples == 1:  # stream it
        sys.stdout.write(args.prompt)
        for events in engine.stream([prompt], params):
            for e in events:
                if e.finish_reason != "stop":
                    sys.stdout.write(decoders[0].push(e.token))
                    sys.stdout.flush()
        print(decoders[0].finish())
        return
    prompts = [prompt] * args.num_samples
    if args.seed is not None:  # one seed per sample, or every sample would be the same
        params = [dataclasses.replace(params, seed=args.seed + i) for i in range(args.num_samples)]
    for i, completion in enumerate(engine.generate(prompts, params)):
        decoder = decoders[i]
        text = "".join(decoder.push(t) for t in completion.tokens) + decoder.finish()
        print(f"--- sample {i + 1}\n{args.prompt}{text}")
