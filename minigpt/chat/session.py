"""`minigpt chat` (talk to a fine-tuned model in the terminal) and `minigpt sample` (continue a prompt with any
run); both decode through the one generation engine (engine.py) and render conversations in the chat format
(text/chat_format.py).

    minigpt chat runs/quickstart/chat                       # interactive; /help lists the commands
    minigpt chat runs/quickstart/chat --prompt "What is Paris?"   # one answer, for scripts
    minigpt sample runs/quickstart/base --prompt "The" --num-samples 3
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from minigpt.chat.engine import Engine, SamplingParams, TextDecoder
from minigpt.text.chat_format import (
    CHAT_DECODING,
    Message,
    chat_ids,
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
# A training run's samples


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
