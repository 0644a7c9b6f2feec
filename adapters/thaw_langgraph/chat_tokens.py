"""Chat messages -> prompt token ids through the model's own chat template, and token ids -> text.

An engine's prefix cache is keyed by token ids, but a chat history comes back as text: re-encoding a reply
rarely gives the ids the model produced (BPE merges across the boundary differ, and a reply's bytes need not
even be valid UTF-8), and then the next turn misses the cache from that reply on. So each prompt's rendered
text and ids, followed by its reply's text and ids, are remembered, and a new prompt whose rendered text
starts with a remembered text is encoded as its ids plus the encoding of the rest: exactly the ids whose KV
the engine holds.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

from langchain_core.messages import BaseMessage, convert_to_openai_messages


@dataclass
class Prompt:
    text: str  # as the chat template renders it
    ids: list[int]  # what the engine is fed: remembered ids of earlier turns, then the encoding of the rest


class ChatTokens:
    def __init__(self, tokenizer, *, remembered: int = 256) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat template")
        self.tokenizer = tokenizer
        self._known: OrderedDict[str, tuple] = OrderedDict()  # text -> its ids, most recent last
        self._limit = remembered
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "ChatTokens":
        from transformers import AutoTokenizer

        path = os.path.expanduser(str(path))
        if not os.path.isdir(path) and (os.path.isabs(path) or path.startswith((".", "~"))):
            # else transformers takes it for a Hub repo id and complains about the form of the id instead
            raise FileNotFoundError(errno.ENOENT, "no tokenizer directory (tokenizer= is a directory holding a "
                                    "tokenizer with a chat template, or a tokenizer object)", path)
        return cls(AutoTokenizer.from_pretrained(path), **kwargs)

    @property
    def stop_token_ids(self) -> list[int]:
        """End of sequence and end of turn: the ids a reply stops at."""
        ids = {self.tokenizer.eos_token_id}
        for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):  # common end-of-turn markers
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        return sorted(i for i in ids if i is not None)

    def render(self, messages: Sequence[BaseMessage]) -> str:
        turns = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else _text(m["content"])}
                 for m in convert_to_openai_messages(list(messages))]
        return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)

    def encode(self, messages: Sequence[BaseMessage]) -> Prompt:
        text = self.render(messages)
        with self._lock:
            best = max((known for known in self._known if text.startswith(known)), key=len, default="")
            ids = list(self._known[best]) if best else []
            if best:
                self._known.move_to_end(best)
        return Prompt(text, ids + self.tokenizer.encode(text[len(best):], add_special_tokens=False))

    def remember(self, prompt: Prompt, reply: Sequence[int]) -> Prompt:
        """Learn the prompt followed by the reply, as a later prompt renders it (the reply's text up to its
        first special token, which a reply's text drops), and return that."""
        kept = self.kept(reply)
        history = Prompt(prompt.text + self.decode(kept), prompt.ids + kept)
        self.learn(history)
        return history

    def learn(self, prompt: Prompt) -> None:
        """Encode text starting with `prompt.text` as `prompt.ids` followed by the rest's encoding."""
        with self._lock:
            self._known[prompt.text] = tuple(prompt.ids)
            self._known.move_to_end(prompt.text)
            while len(self._known) > self._limit:
                self._known.popitem(last=False)

    def kept(self, reply: Sequence[int]) -> list[int]:
        """The reply's ids up to its first special token: the part a later prompt holds as the same ids."""
        special = set(self.tokenizer.all_special_ids)
        return list(next((reply[:i] for i, t in enumerate(reply) if t in special), reply))

    def decode(self, token_ids: Sequence[int], *, special: bool = False) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=not special,
                                     clean_up_tokenization_spaces=False)


def _text(content: list) -> str:
    """The text parts of a multi-part message; any other part is refused (this model reads text only)."""
    parts = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
        elif part.get("type") == "text":
            parts.append(part["text"])
        else:
            raise ValueError(f"ChatThaw reads text only; a message has a {part.get('type')!r} part")
    return "".join(parts)
