r"""KV-cached decoding pieces: a growing cache, batch merging, sampling, text streams with stops.

The serving engine (:mod:`gatelab.edge.engine`) builds on these; nothing here holds a thread.

**Cache.** :class:`GrowingLayer` is a transformers cache layer whose appends write into a
preallocated buffer that doubles when full, so a decode step costs O(new tokens) instead of the
O(length) ``torch.cat`` of ``DynamicLayer``. A filled region ``[:length]`` is never written
again, which lets other sequences keep views of it (the prefix store of the engine) without
copies. :func:`merge_rows` left-pads single-sequence caches of different lengths into one
batched cache plus its ``(B, L)`` attention mask, the layout transformers' batched ``generate``
uses.

**Sampling** (:func:`choose_tokens`): greedy at ``temperature == 0``; otherwise
:math:`p \propto \exp(z / T)` restricted to the nucleus, the smallest set of most likely tokens
whose probability reaches ``top_p`` (Holtzman et al. 2019, arXiv:1904.09751), drawn with the
request's own ``torch.Generator`` (``seed``). Reported log-probabilities are always those of the
model itself, :math:`\log\mathrm{softmax}(z)`, before temperature and nucleus.

**Text** (:class:`TextStream`): generated token ids become text by decoding the whole sequence
each step (tokens that merge bytes, e.g. UTF-8 split over two tokens, come out right); text that
could still be the start of a ``stop`` string, or ends in an incomplete character, is held back
until it is decided. At a stop string the text is cut before it (OpenAI's semantics).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

MIN_CAPACITY = 64  # tokens allocated at least when a buffer is created or grown


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` appending into a buffer of doubling capacity (no per-step copy).

    Args:
        keys, values: initial states ``(B, H, T, D)`` (copied into a fresh buffer), or None.
        extra: tokens of room to reserve beyond ``T``.
    """

    _layer_type = None  # not registered as a transformers layer type

    def __init__(
        self,
        keys: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        extra: int = 0,
    ) -> None:
        super().__init__()
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self.length = 0
        if keys is not None and values is not None:
            self.lazy_initialization(keys, values)
            self._reserve(keys, keys.shape[-2] + extra)
            self._write(keys, values)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Remember the device; buffers are allocated on the first write."""
        self.device = key_states.device
        self.is_initialized = True

    def _reserve(self, like: torch.Tensor, need: int) -> None:
        if self._k is not None and need <= self._k.shape[-2]:
            return
        capacity = max(need, MIN_CAPACITY, 2 * (0 if self._k is None else self._k.shape[-2]))
        b, h, _, d = like.shape
        k = like.new_zeros(b, h, capacity, d)  # (B, H, capacity, D)
        v = k.clone()
        if self._k is not None:
            k[..., : self.length, :] = self._k[..., : self.length, :]
            v[..., : self.length, :] = self._v[..., : self.length, :]
        self._k, self._v = k, v

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        end = self.length + key_states.shape[-2]
        self._k[..., self.length : end, :] = key_states
        self._v[..., self.length : end, :] = value_states
        self.length = end
        self.keys = self._k[..., :end, :]  # views: (B, H, length, D)
        self.values = self._v[..., :end, :]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``(B, H, t, D)`` states and return the whole ``(B, H, length, D)`` cache."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._reserve(key_states, self.length + key_states.shape[-2])
        self._write(key_states, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """Tokens held."""
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        """Not supported: a filled region is never changed (views of it may be shared)."""
        raise NotImplementedError("GrowingLayer caches are rebuilt, never cropped in place")


def new_cache(n_layers: int) -> Cache:
    """An empty cache of ``n_layers`` :class:`GrowingLayer` s."""
    return Cache(layers=[GrowingLayer() for _ in range(n_layers)])


def cache_states(
    cache: Cache, length: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(keys, values)`` views of the first ``length`` positions (all by default)."""
    n = cache.layers[0].length if length is None else length
    return [(layer.keys[..., :n, :], layer.values[..., :n, :]) for layer in cache.layers]


def cache_from_states(states: list[tuple[torch.Tensor, torch.Tensor]], extra: int = 0) -> Cache:
    """A fresh cache holding copies of ``states`` with room for ``extra`` more tokens."""
    return Cache(layers=[GrowingLayer(k, v, extra) for k, v in states])


def merge_rows(
    rows: list[list[tuple[torch.Tensor, torch.Tensor]]], lengths: list[int], extra: int
) -> tuple[Cache, torch.Tensor]:
    """Left-pad per-row states (each ``(1, H, T_b, D)`` per layer) into one batched cache.

    Args:
        rows: for each row, its per-layer states; row ``b`` holds ``lengths[b]`` real tokens
            at the END of its states (it may itself be left-padded).
        lengths: real tokens per row.
        extra: tokens of room to reserve for decoding.

    Returns:
        The cache ``(B, H, L, D)`` per layer, ``L`` the longest row, and the attention mask
        ``(B, L)`` (1 on real tokens, 0 on padding).
    """
    width = max(states[0][0].shape[-2] for states in rows)
    n_layers = len(rows[0])
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=rows[0][0][0].device)
    for b, n in enumerate(lengths):
        mask[b, width - n :] = 1
    layers = []
    for layer in range(n_layers):
        k0 = rows[0][layer][0]
        b, (_, h, _, d) = len(rows), k0.shape
        keys = k0.new_zeros(b, h, width, d)  # (B, H, L, D)
        values = keys.clone()
        for i, states in enumerate(rows):
            k, v = states[layer]
            keys[i, :, width - k.shape[-2] :, :] = k[0]
            values[i, :, width - v.shape[-2] :, :] = v[0]
        layers.append(GrowingLayer(keys, values, extra))
    return Cache(layers=layers), mask


def select_rows(cache: Cache, mask: torch.Tensor, keep: list[int]) -> tuple[Cache, torch.Tensor]:
    """The rows ``keep`` of a batched cache, with leading all-padding columns dropped."""
    index = torch.tensor(keep, device=mask.device)
    mask = mask[index]
    real = mask.any(dim=0).nonzero()
    start = int(real[0]) if len(real) else mask.shape[1]
    layers = []
    for layer in cache.layers:
        room = layer._k.shape[-2] - layer.length  # keep the room already reserved
        keys, values = layer.keys[index, :, start:], layer.values[index, :, start:]
        layers.append(GrowingLayer(keys, values, room))
    return Cache(layers=layers), mask[:, start:]


RECORD_TOP = 20  # alternatives kept per scored position: any request's top-k (<= 20) reads them


@dataclass
class Records:
    """What scoring a prompt gives, per token ``i``: ``log p(t_i | t_<i)`` and the top tokens.

    Row 0 has no distribution (NaN, ids -1). ``top_values``/``top_ids`` are ``(T, K)``, the
    ``K = RECORD_TOP`` most likely tokens of the distribution that predicted token ``i``.
    """

    logprobs: torch.Tensor  # (T,) float64
    top_values: torch.Tensor  # (T, K) float64
    top_ids: torch.Tensor  # (T, K) int64

    @classmethod
    def empty(cls, n: int) -> Records:
        """Records for ``n`` tokens, none filled yet."""
        return cls(
            torch.full((n,), float("nan"), dtype=torch.float64),
            torch.full((n, RECORD_TOP), float("nan"), dtype=torch.float64),
            torch.full((n, RECORD_TOP), -1, dtype=torch.long),
        )


def score_chunk_size(vocab_size: int, limit: int) -> int:
    """Tokens per scoring forward so that its ``(C, V)`` float32 log-probabilities stay ~64 MB."""
    return max(16, min(limit, (1 << 24) // vocab_size))


@torch.no_grad()
def prefill_chunk(
    model: torch.nn.Module,
    cache: Cache,
    ids: list[int],
    start: int,
    end: int,
    records: Records | None = None,
) -> torch.Tensor:
    """Feed ``ids[start:end]`` to a cache holding ``ids[:start]``; returns the next log-probs.

    With ``records`` every position's log-softmax is computed and the records of tokens
    ``start+1 .. end`` (those inside ``ids``) are filled; without, only the last position's
    logits are (``logits_to_keep=1``: the LM head over one position).

    Returns:
        ``(V,)`` log-probabilities of the token after ``ids[end - 1]`` (float32; float64 for
        a float64 model).
    """
    device = next(model.parameters()).device
    chunk = torch.tensor([ids[start:end]], device=device)  # (1, C)
    keep = 0 if records is not None else 1  # 0: logits at every position
    logits = model(chunk, cache=cache, use_cache=True, logits_to_keep=keep).logits
    wide = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logprobs = torch.log_softmax(logits[0].to(wide), dim=-1)  # (C or 1, V)
    if records is not None:
        inside = min(end, len(ids) - 1) - start  # positions whose next token is in ids
        if inside > 0:
            nxt = torch.tensor(ids[start + 1 : start + 1 + inside], device=device)  # (n,)
            rows = logprobs[:inside]
            records.logprobs[start + 1 : start + 1 + inside] = rows.gather(-1, nxt[:, None])[
                :, 0
            ].cpu()
            values, top = top_alternatives(rows, min(RECORD_TOP, rows.shape[-1]))
            records.top_values[start + 1 : start + 1 + inside, : values.shape[-1]] = values.cpu()
            records.top_ids[start + 1 : start + 1 + inside, : top.shape[-1]] = top.cpu()
    return logprobs[-1]


def top_alternatives(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely tokens per position: values and ids ``(..., k)``."""
    top = torch.topk(logprobs, k, dim=-1)
    return top.values, top.indices


def choose_tokens(
    logits: torch.Tensor,
    temperature: list[float],
    top_p: list[float],
    generators: list[torch.Generator],
) -> list[int]:
    """One next token per row of ``logits (B, V)`` (see module doc for the rule)."""
    out = []
    for b in range(logits.shape[0]):
        if temperature[b] == 0:
            out.append(int(torch.argmax(logits[b])))
            continue
        probs = torch.softmax(logits[b].double() / temperature[b], dim=-1)  # (V,)
        if top_p[b] < 1:
            sorted_probs, order = torch.sort(probs, descending=True)
            before = torch.cumsum(sorted_probs, 0) - sorted_probs  # mass of strictly better
            sorted_probs[before >= top_p[b]] = 0  # the most likely token always stays
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        out.append(int(torch.multinomial(probs, 1, generator=generators[b])))
    return out


@dataclass
class TextStream:
    """Incremental text of one generated sequence, with ``stop`` strings (see module doc).

    ``push`` a token id, get the newly decided text; :attr:`stopped` becomes True at a stop
    string. :attr:`offsets` are the character offsets of each token's text in :attr:`text`.
    """

    tokenizer: Any
    stop: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    text: str = ""  # everything decided so far (released or not yet)
    released: int = 0  # characters of `text` handed out
    offsets: list[int] = field(default_factory=list)
    stopped: bool = False

    def push(self, token: int) -> str:
        """Add one token; returns the text that became final (may be empty)."""
        self.offsets.append(len(self.text))
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            look_from = max(0, len(self.text) - max(map(len, self.stop)) + 1)
            hits = [i for s in self.stop if (i := full.find(s, look_from)) >= 0]
            if hits:
                self.text, self.stopped = full[: min(hits)], True
                return self._release(len(self.text))
        self.text = full
        return self._release(self._safe_end())

    def _safe_end(self) -> int:
        """End of the text that no stop string or unfinished character can still change."""
        end = len(self.text)
        if self.text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: more bytes to come
            end -= 1
        hold = 0  # the longest tail that is the start of a stop string
        for s in self.stop:
            for n in range(min(len(s) - 1, end), 0, -1):
                if self.text[end - n : end] == s[:n]:
                    hold = max(hold, n)
                    break
        return max(end - hold, self.released)

    def _release(self, end: int) -> str:
        out = self.text[self.released : end]
        self.released = max(self.released, end)
        return out

    def finish(self) -> str:
        """The sequence ended: everything held back is final."""
        return self._release(len(self.text))
