"""`minigpt chat` (talk to a fine-tuned model in the terminal) and `minigpt sample` (continue a prompt with any
run); both decode through the one generation engine (engine.py) and render conversations in the chat format
(text/chat_format.py).

    minigpt chat runs/quickstart/chat                       # interactive; /help lists the commands
    minigpt chat runs/quickstart/chat --prompt "What is Paris?"   # one answer, for scripts
    minigpt sample runs/quickstart/base --prompt "The" --num-samples 3
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Iterator

from minigpt.chat.engine import Engine, SamplingParams, TextDecoder
from minigpt.common import UserError, pick_device
from minigpt.runs.loading import load_run
from minigpt.text.chat_format import (
    CHAT_DECODING,
    Message,
    chat_ids,
    end_of_turn_ids,
    fit_to_window,
    special_ids,
    stop_ids,
)

# ----------------------------------------------------------------------------------------------------------------
# Talking


class ChatSession:
    """A conversation with a model through the generation engine: history, system prompt, temperature."""

    def __init__(self, model, tokenizer, system: str = "", temperature: float = CHAT_DECODING["temperature"],
                 top_k: int = CHAT_DECODING["top_k"], top_p: float = CHAT_DECODING["top_p"],
                 max_new_tokens: int = 200, seed: int | None = None,
                 frequency_penalty: float = CHAT_DECODING["frequency_penalty"],
                 presence_penalty: float = CHAT_DECODING["presence_penalty"]):
        self.model, self.tokenizer = model, tokenizer
        self.engine = Engine(model, max_batch=1, seed=seed)
        self.system, self.temperature, self.top_k, self.top_p = system, temperature, top_k, top_p
        self.frequency_penalty, self.presence_penalty = frequency_penalty, presence_penalty
        self.max_new_tokens = min(max_new_tokens, model.config.block_size // 2)
        self.history: list[Message] = []
        chat_ids(tokenizer)

    def reset(self) -> None:
        self.history = []

    def messages(self) -> list[Message]:
        return ([Message("system", self.system)] if self.system else []) + self.history

    def reply(self, text: str) -> Iterator[str]:
        """Stream the assistant's answer to `text` piece by piece; the full answer joins the history."""
        self.history.append(Message("user", text))
        kept, prompt = fit_to_window(self.tokenizer, self.messages(), self.model.config.block_size,
                                     self.max_new_tokens)
        self.history = [m for m in kept if m.role != "system"]
        params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                                top_p=self.top_p, stop_token_ids=stop_ids(self.tokenizer),
                                frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty)
        decoder = TextDecoder(self.tokenizer.token_bytes, skip=special_ids(self.tokenizer))
        for events in self.engine.stream([prompt], params):
            for event in events:
                if event.finish_reason != "stop":
                    piece = decoder.push(event.token)
                    if piece:
                        yield piece
        tail = decoder.finish()
        if tail:
            yield tail
        self.history.append(Message("assistant", decoder.text.strip()))


HELP = """commands:
  /reset          forget the conversation
  /system TEXT    set the system prompt (empty to clear) and start over
  /temp X         sampling temperature (0 = greedy)
  /help           this text
  /quit           leave (or Ctrl-D)"""


def interactive(session: ChatSession, out=sys.stdout) -> None:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    print(f"Chatting with {session.model.num_params():,}-parameter model. /help for commands, Ctrl-D to leave.",
          file=out, flush=True)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=out)
            return
        except KeyboardInterrupt:
            print(file=out)
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, arg = text.partition(" ")
            if command in ("/quit", "/exit"):
                return
            elif command == "/reset":
                session.reset()
                print("(conversation cleared)", file=out, flush=True)
            elif command == "/system":
                session.system = arg.strip()
                session.reset()
                print(f"(system prompt {'set' if session.system else 'cleared'}; conversation cleared)", file=out,
                      flush=True)
            elif command == "/temp":
                try:
                    value = float(arg)
                    if value < 0:
                        raise ValueError
                except ValueError:
                    print("(usage: /temp X with X >= 0)", file=out, flush=True)
                    continue
                session.temperature = value
                print(f"(temperature {value})", file=out, flush=True)
            else:
                print(HELP, file=out, flush=True)
            continue
        print("bot> ", end="", file=out, flush=True)
        try:
            for piece in session.reply(text):
                print(piece, end="", file=out, flush=True)
        except KeyboardInterrupt:
            pass
        print(file=out, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Command line: `minigpt chat`


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


def continue_text(model, tokenizer, prompt: str, max_new_tokens: int, seed: int) -> str:
    """A short seeded continuation of `prompt` (the samples a training run shows at each evaluation)."""
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, seed=seed,
                            stop_token_ids=[tokenizer.eot_id])
    # prepack=False: for one short sample, packing the weights for oneDNN (model/cpu_inference.py) costs more
    # than it saves
    engine = Engine(model, max_batch=1, prepack=False)
    (completion,) = engine.generate([ids[-(model.config.block_size - 1):]], params)
    model.train()
    return prompt + tokenizer.decode(completion.tokens)


# ----------------------------------------------------------------------------------------------------------------
# Command line: `minigpt sample`


def add_sample_arguments(parser) -> None:
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


def sample_main(args) -> None:
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
