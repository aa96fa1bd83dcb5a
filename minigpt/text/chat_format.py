"""The chat format: how a conversation becomes tokens, everywhere (fine-tuning, `minigpt chat`, the server, the
exported tokenizer's template, the web page's decoding defaults).

A conversation is rendered as one token sequence, starting like every pretraining document with end-of-text:

    <|endoftext|><|system|>You are helpful.<|end|><|user|>What is Paris?<|end|><|assistant|>Paris is ...<|end|>

Fine-tuning trains only on what the assistant says: the tokens of each assistant message and the <|end|> closing
it (so the model learns to stop). To generate, the conversation so far is rendered and followed by
<|assistant|>; decoding stops at <|end|> (or end-of-text).

One end of turn everywhere: `end_of_turn_ids` (<|end|> and <|endoftext|> for a tokenizer with the chat tokens,
<|endoftext|> alone otherwise) is where `minigpt chat`, `minigpt sample`, both endpoints of `minigpt serve` and the
exported generation_config.json stop; special tokens are never shown as text unless asked (`special_ids`).
"""


from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from minigpt.common import UserError

ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system message, read the same everywhere
END_OF_TURN = "<|end|>"
ROLES_HINT = "use system, developer, user or assistant"


# How a chatbot decodes by default: `minigpt chat`, its ChatSession, the web page's settings and the quickstart's
# report. Greedy decoding makes small models loop ("a family of the family of the family of ..."); sampling at a
# moderate temperature with a frequency penalty (subtracted from a token's logit once per earlier use in the reply)
# does not. docs/quickstart.md measures the choice on held-out questions. --temperature 0 is greedy.
CHAT_DECODING = {"temperature": 0.7, "top_k": 0, "top_p": 0.9, "frequency_penalty": 0.5, "presence_penalty": 0.0}


@dataclasses.dataclass
class Message:
    role: str  # system, user or assistant ("developer" is read as system)
    content: str


@dataclasses.dataclass
class Conversation:
    """Messages as fine-tuning reads them (conversations.py, bundled.py), with the key of their held-out split."""

    key: str  # stable identity: decides the held-out split
    messages: list[Message]
    subject: str = ""  # for wiki-qa: the article's title


def chat_role(role: str) -> str | None:
    """The role of the chat format a message's role is rendered as (developer -> system), or None if unknown."""
    role = ROLE_ALIASES.get(role, role)
    return role if role in ROLE_TOKENS else None


def chat_ids(tokenizer) -> dict[str, int]:
    """Ids of the role tokens and <|end|>; a clear error for a tokenizer without them."""
    ids = tokenizer.chat_token_ids
    if not ids:
        raise UserError(f"tokenizer {tokenizer.name} has no chat tokens: fine-tune with `minigpt sft`, which adds them")
    return ids


def as_messages(messages: Sequence[Message | dict]) -> list[Message]:
    out = []
    for m in messages:
        m = m if isinstance(m, Message) else Message(m.get("role", ""), m.get("content", ""))
        role = chat_role(m.role)
        if role is None:
            raise UserError(f"unknown chat role {m.role!r}: {ROLES_HINT}")
        if not isinstance(m.content, str):
            raise UserError("message content must be a string")
        out.append(m if role == m.role else Message(role, m.content))
    return out


def render(tokenizer, messages: Sequence[Message | dict], add_generation_prompt: bool = False
           ) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation, and for each id whether it is trained on (assistant text and its <|end|>).

    Message text is encoded as plain text: a user typing "<|end|>" gets those characters, not the token.
    """
    ids_of = chat_ids(tokenizer)
    ids, trained = [tokenizer.eot_id], [False]
    for m in as_messages(messages):
        body = tokenizer.encode_ordinary(m.content) + [ids_of[END_OF_TURN]]
        is_assistant = m.role == "assistant"
        ids += [ids_of[ROLE_TOKENS[m.role]], *body]
        trained += [False] + [is_assistant] * len(body)
    if add_generation_prompt:
        ids.append(ids_of[ROLE_TOKENS["assistant"]])
        trained.append(False)
    return ids, trained


def chat_template(tokenizer) -> str | None:
    """The chat format as a Jinja template (what `render` does, as text), or None for a tokenizer without chat
    tokens: the exported tokenizer_config.json and the server's /tokenizer_info carry it, so every client that
    renders conversations itself (transformers' apply_chat_template, vLLM, ...) renders them as we train on them.

    `<|endoftext|>`, then `<|role|>content<|end|>` per message, then `<|assistant|>` when asked to prompt a reply.
    """
    if not tokenizer.chat_token_ids:
        return None
    roles = {**ROLE_TOKENS, **{alias: ROLE_TOKENS[role] for alias, role in ROLE_ALIASES.items()}}
    table = ", ".join(f"'{role}': '{token}'" for role, token in roles.items())
    return ("{%- set role_tokens = {" + table + "} -%}"
            "{{- '" + tokenizer.decode([tokenizer.eot_id]) + "' -}}"
            "{%- for message in messages -%}"
            "{%- if message['role'] not in role_tokens -%}"
            "{{- raise_exception('unknown chat role ' + message['role'] + ': " + ROLES_HINT + "') -}}"
            "{%- endif -%}"
            "{{- role_tokens[message['role']] + message['content'] + '" + END_OF_TURN + "' -}}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- role_tokens['assistant'] -}}{%- endif -%}")


def stop_ids(tokenizer) -> list[int]:
    """Where a chat reply ends: <|end|> or <|endoftext|> (a clear error for a tokenizer without chat tokens)."""
    chat_ids(tokenizer)
    return end_of_turn_ids(tokenizer)


def end_of_turn_ids(tokenizer) -> list[int]:
    """The tokens that end generation for this tokenizer's models, chat or not: <|end|> and <|endoftext|> when the
    tokenizer has the chat tokens, else <|endoftext|>. The engine's callers and the Hugging Face export use this."""
    ids = tokenizer.chat_token_ids
    return [ids[END_OF_TURN], tokenizer.eot_id] if ids else [tokenizer.eot_id]


def special_ids(tokenizer) -> frozenset[int]:
    """Ids of the special tokens: left out of generated text by default (vLLM's skip_special_tokens)."""
    return frozenset(tokenizer.special_tokens.values())


def fit_to_window(tokenizer, messages: list[Message], window: int, reply_room: int) -> tuple[list[Message], list[int]]:
    """Drop the oldest turns (never the system prompt, never the last user message) until the prompt leaves
    `reply_room` tokens of the context window for the answer. Returns the kept messages and the prompt ids."""
    messages = list(messages)
    while True:
        ids, _ = render(tokenizer, messages, add_generation_prompt=True)
        if len(ids) + reply_room <= window:
            return messages, ids
        first = next((i for i, m in enumerate(messages) if m.role != "system"), None)
        if first is None or first >= len(messages) - 1:  # only the newest message is left: cut it from the left
            keep = window - reply_room
            if keep < 8:
                raise UserError(f"the context window ({window} tokens) leaves no room for a reply of {reply_room}")
            return messages, ids[-keep:]
        del messages[first]  # the oldest turn: its user message and the replies that followed it
        while first < len(messages) - 1 and messages[first].role == "assistant":
            del messages[first]
