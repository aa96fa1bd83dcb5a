"""`minigpt chat`: talk to a fine-tuned model in the terminal, or answer one --prompt."""

from __future__ import annotations

from minigpt.chat.session import ChatSession, interactive
from minigpt.common import UserError, pick_device
from minigpt.runs.loading import load_run
from minigpt.text.chat_format import (
    CHAT_DECODING,
)


def add_arguments(parser) -> None:
    parser.add_argument("run", help="a fine-tuned run folder or checkpoint (minigpt sft)")
    parser.add_argument("--prompt", help="answer this one message and exit (for scripts)")
    parser.add_argument("--system", default="", help="system prompt")
    d = CHAT_DECODING
    parser.add_argument("--temperature", type=float, default=d["temperature"],
                        help=f"0 = greedy (default: {d['temperature']})")
    parser.add_argument("--top-k", type=int, default=d["top_k"], help=f"0 = off (default: {d['top_k']})")
    parser.add_argument("--top-p", type=float, default=d["top_p"], help=f"(default: {d['top_p']})")
    parser.add_argument("--frequency-penalty", type=float, default=d["frequency_penalty"],
                        help="subtracted from a token's logit once per earlier use in the reply, against loops "
                             f"(default: {d['frequency_penalty']})")
    parser.add_argument("--presence-penalty", type=float, default=d["presence_penalty"],
                        help="subtracted once from every token already in the reply "
                             f"(default: {d['presence_penalty']})")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="longest reply (default: 200)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument("--checkpoint", default="latest", help="latest, best or a step_N folder name")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default: cpu)")


def main(args) -> None:
    if args.temperature < 0 or args.max_new_tokens < 1:
        raise UserError("--temperature must be >= 0 and --max-new-tokens >= 1")
    model, tokenizer, _ = load_run(args.run, pick_device(args.device), args.checkpoint)
    model.requires_grad_(False)  # generation only; a local switch, not torch's global grad mode
    session = ChatSession(model, tokenizer, args.system, args.temperature, args.top_k, args.top_p,
                          args.max_new_tokens, args.seed, args.frequency_penalty, args.presence_penalty)
    if args.prompt is not None:
        for piece in session.reply(args.prompt):
            print(piece, end="", flush=True)
        print()
        return
    interactive(session)
