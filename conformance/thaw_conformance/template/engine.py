"""A toy inference engine: a tiny numpy transformer with a paged KV cache and a token-id prefix cache.

It holds, in miniature, the state a real engine holds and a thaw adapter must capture: KV in fixed-size pages
("blocks") of a shared pool, a prefix table from a hash chain of full pages to blocks (cached blocks stay in
the table after their request ends, until the pool needs them), and requests with their sampling RNG.
Every token is computed on its own in float32, so a token's KV is the same bytes whether it was computed in
prefill, in decode, or restored: a toy can afford that, and it makes every check exact.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class ToyModelConfig:
    vocab_size: int = 256
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2
    head_dim: int = 16
    seed: int = 0  # the random weights are a function of the config, seed included


def make_weights(config: ToyModelConfig) -> dict[str, np.ndarray]:
    """Seeded random float32 weights, scaled so that the tiny model's outputs vary from token to token."""
    rng = np.random.default_rng(config.seed)
    h, a = config.hidden_size, config.num_heads * config.head_dim

    def normal(*shape):
        return (rng.standard_normal(shape) * 4.0 / np.sqrt(shape[0])).astype(np.float32)

    weights = {"embed": normal(config.vocab_size, h) * np.float32(np.sqrt(config.vocab_size / h))}
    for i in range(config.num_layers):
        weights.update({f"layers.{i}.wq": normal(h, a), f"layers.{i}.wk": normal(h, a), f"layers.{i}.wv": normal(h, a),
                        f"layers.{i}.wo": normal(a, h), f"layers.{i}.w1": normal(h, 2 * h),
                        f"layers.{i}.w2": normal(2 * h, h)})
    weights["lm_head"] = normal(h, config.vocab_size)
    return weights


def page_hash(parent: Optional[str], tokens: Sequence[int]) -> str:
    """The prefix table's key for a full page: SHA-256 over the parent page's hash and the page's int32 tokens."""
    digest = hashlib.sha256(bytes.fromhex(parent) if parent else b"")
    digest.update(np.asarray(tokens, dtype="<i4").tobytes())
    return digest.hexdigest()


@dataclass
class ToyRequest:
    id: str
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    rng: Optional[np.random.Generator] = None  # seeded sampling only
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # block of each page of this request's tokens
    hashes: list[str] = field(default_factory=list)  # prefix-table key of each full page
    num_computed: int = 0  # tokens whose KV is in the blocks
    cached_tokens: int = 0  # prompt tokens found in the prefix table at submit

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


class ToyEngine:
    def __init__(self, config: ToyModelConfig, weights: dict[str, np.ndarray], *, page_size: int = 4,
                 num_blocks: int = 512) -> None:
        self.config, self.weights, self.page_size = config, weights, page_size
        shape = (num_blocks, page_size, config.num_heads, config.head_dim)
        self.k = [np.zeros(shape, np.float32) for _ in range(config.num_layers)]
        self.v = [np.zeros(shape, np.float32) for _ in range(config.num_layers)]
        self.free: list[int] = list(range(num_blocks))  # evictable: unused first, then cached by age
        self.refs = [0] * num_blocks
        self.table: dict[str, int] = {}  # prefix table: page hash -> block
        self.block_info: dict[int, tuple[Optional[str], str, tuple[int, ...]]] = {}  # block -> (parent, hash, tokens)
        self.running: dict[str, ToyRequest] = {}
        self._ids = itertools.count()

    @property
    def num_blocks(self) -> int:
        return len(self.refs)

    # --- blocks and the prefix table ---

    def allocate(self) -> int:
        if not self.free:
            raise MemoryError("the toy engine's KV pool is full")
        block = self.free.pop(0)
        if block in self.block_info:  # evict its cached page
            del self.table[self.block_info.pop(block)[1]]
        self.refs[block] = 1
        return block

    def hold(self, block: int) -> None:
        if self.refs[block] == 0:
            self.free.remove(block)
        self.refs[block] += 1

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free.append(block)

    def cache_page(self, block: int, parent: Optional[str], tokens: Sequence[int]) -> str:
        """Enter a full page into the prefix table (a page already there keeps its first block)."""
        key = page_hash(parent, tokens)
        if key not in self.table:
            self.table[key] = block
            self.block_info[block] = (parent, key, tuple(tokens))
        return key

    def reset(self) -> None:
        """Forget every cached page and request (the KV bytes stay until overwritten)."""
        self.running.clear()
        self.table.clear()
        self.block_info.clear()
        self.refs = [0] * self.num_blocks
        self.free = list(range(self.num_blocks))

    # --- requests ---

    def submit(self, prompt: Sequence[int], max_tokens: int, temperature: float = 0.0,
               seed: Optional[int] = None) -> ToyRequest:
        rid = next(i for i in (f"toy-{n}" for n in self._ids) if i not in self.running)  # a restored one keeps its id
        request = ToyRequest(rid, [int(t) for t in prompt], max_tokens, temperature,
                             np.random.default_rng(seed) if temperature > 0 else None)
        parent = None
        for start in range(0, (len(prompt) - 1) // self.page_size * self.page_size, self.page_size):
            key = page_hash(parent, request.prompt[start : start + self.page_size])
            if key not in self.table:
                break
            self.hold(self.table[key])
            request.blocks.append(self.table[key])
            request.hashes.append(key)
            parent = key
        request.num_computed = request.cached_tokens = len(request.blocks) * self.page_size
        self.running[request.id] = request
        return request

    def step(self) -> list[ToyRequest]:
        """Advance every running request by one token; returns those that finished."""
        finished = []
        for request in list(self.running.values()):
            logits = None
            while request.num_computed < len(request.tokens):
                logits = self._compute(request)
            self._sample(request, logits)
            if len(request.output) >= request.max_tokens:
                finished.append(self._retire(request.id))
        return finished

    def abort(self, request_id: str) -> Optional[ToyRequest]:
        """Drop a running request (None if none runs by that id), as a finished one is dropped."""
        return self._retire(request_id) if request_id in self.running else None

    def _retire(self, request_id: str) -> ToyRequest:
        """Take a request out of the running set and let go of its blocks (its cached pages stay in the table)."""
        request = self.running.pop(request_id)
        for block in request.blocks:
            self.release(block)
        return request

    def generate(self, prompt: Sequence[int], max_tokens: int, temperature: float = 0.0,
                 seed: Optional[int] = None) -> ToyRequest:
        request = self.submit(prompt, max_tokens, temperature, seed)
        while request.id in self.running:
            self.step()
        return request

    # --- the model ---

    def _compute(self, request: ToyRequest) -> np.ndarray:
        """Run the model on the request's next uncomputed token, writing its KV; returns the logits."""
        pos, p = request.num_computed, self.page_size
        if pos // p == len(request.blocks):
            request.blocks.append(self.allocate())
        block, slot = request.blocks[pos // p], pos % p
        w, c = self.weights, self.config
        x = w["embed"][request.tokens[pos]] + _position(pos, c.hidden_size)
        for i in range(c.num_layers):
            h = _rms(x)
            q = (h @ w[f"layers.{i}.wq"]).reshape(c.num_heads, c.head_dim)
            self.k[i][block, slot] = (h @ w[f"layers.{i}.wk"]).reshape(c.num_heads, c.head_dim)
            self.v[i][block, slot] = (h @ w[f"layers.{i}.wv"]).reshape(c.num_heads, c.head_dim)
            keys = np.concatenate([self.k[i][b] for b in request.blocks])[: pos + 1]  # [tokens, heads, dim]
            values = np.concatenate([self.v[i][b] for b in request.blocks])[: pos + 1]
            scores = np.einsum("hd,thd->ht", q, keys) / np.float32(np.sqrt(c.head_dim))
            attn = np.exp(scores - scores.max(axis=-1, keepdims=True))
            attn /= attn.sum(axis=-1, keepdims=True)
            x = x + np.einsum("ht,thd->hd", attn, values).reshape(-1) @ w[f"layers.{i}.wo"]
            x = x + np.maximum(_rms(x) @ w[f"layers.{i}.w1"], 0) @ w[f"layers.{i}.w2"]
        request.num_computed += 1
        if request.num_computed % p == 0:
            parent = request.hashes[-1] if request.hashes else None
            request.hashes.append(self.cache_page(block, parent, request.tokens[pos + 1 - p : pos + 1]))
        return _rms(x) @ w["lm_head"]

    def _sample(self, request: ToyRequest, logits: np.ndarray) -> None:
        logprobs = logits - np.float32(np.log(np.exp(logits - logits.max()).sum()) + logits.max())
        if request.rng is None:
            token = int(np.argmax(logprobs))
        else:
            probs = np.exp(logprobs.astype(np.float64) / request.temperature)
            token = int(np.searchsorted(np.cumsum(probs), request.rng.random() * probs.sum(), side="right"))
            token = min(token, len(probs) - 1)
        request.output.append(token)
        request.logprobs.append(float(logprobs[token]))


def _rms(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x) + np.float32(1e-6))


def _position(pos: int, size: int) -> np.ndarray:
    freqs = np.exp(-np.log(10000.0) * np.arange(0, size, 2) / size)
    return np.concatenate([np.sin(pos * freqs), np.cos(pos * freqs)]).astype(np.float32)
