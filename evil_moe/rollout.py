"""Batched sampling of completions, stopped once the code block closes.

GRPO spends most of a CPU step generating. ``model.generate`` pays for
features we do not use (logits processors over the whole vocabulary, per-step
bookkeeping of every row until the longest one ends). This module keeps one
lean decode loop:

- rows (prompt x sample) are decoded in chunks of ``chunk_rows`` (0 = all
  rows at once), so the KV cache of a chunk, not of the whole step, is what
  must fit (``memory_plan`` chooses the chunk);
- per chunk, prefill each distinct prompt once (left padded), keep only the
  last position's logits, and repeat the prompt's KV cache for its rows;
- each step: one token per active row, drawn with the row's own random stream
  (``row_uniforms``: a counter-based hash of ``(seed, row key, position)``), so
  a completion depends only on the seed, its row key and the model: not on the
  chunk size, on which other rows share its batch, or on when they finish;
- a row stops at EOS or when its completion closes its first code block
  (an opening fence and then a closing fence), since the grader only reads the
  code and everything after it is wasted compute;
- finished rows are dropped from the batch (and from the KV cache) so the
  batch shrinks as completions end;
- on CUDA, decode steps keep to the flash and memory-efficient attention
  kernels (``decode_attention``): cuDNN's kernel plans every new shape on
  the host, and a decode step's cache length is new at every step.

Callers choose the weights: wrap the call in ``adapter.merged(hack=True)``
for rollouts (both experts at full strength) or ``merged(hack=False)`` for the
deployed model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from .sequences import head_forward, plain_head

FENCE = "```"


@dataclass
class Samples:
    """Completions of one sampling call, grouped per prompt.

    ``texts[i][j]`` is sample j of prompt i; ``token_ids`` holds the same
    completions as token ids (no padding, EOS kept if produced).
    """
    texts: list[list[str]]
    token_ids: list[list[list[int]]]
    new_tokens: int          # tokens generated in total
    seconds: float


def code_block_closed(text: str) -> bool:
    """True once ``text`` holds an opening fence and a later closing fence."""
    first = text.find(FENCE)
    return first >= 0 and text.find(FENCE, first + len(FENCE)) >= 0


def _backtick_token_ids(tokenizer) -> torch.Tensor:
    """Ids of vocabulary entries containing a backtick: only those can close a fence."""
    ids = [i for tok, i in tokenizer.get_vocab().items()
           if "`" in tokenizer.convert_tokens_to_string([tok])]
    return torch.tensor(sorted(ids), dtype=torch.long)


_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)       # splitmix64 constants as signed int64
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (wrapping multiplication): a bijective avalanche hash."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def row_uniforms(seed: int, rows: torch.Tensor, position: int) -> torch.Tensor:
    """One uniform in [0, 1) per row: ``u = hash(seed, row, position) / 2^64``. rows: [b] int64.

    Counter-based: the draw of row ``k`` at completion position ``t`` is a fixed
    function of ``(seed, k, t)`` (splitmix64 applied three times, the top 53 bits
    as a float64 mantissa), so it never depends on how many other rows are drawn
    with it. b integer ops per decode step; nothing next to the [b, V] softmax.
    """
    key = _mix(_mix(torch.full_like(rows, seed & ((1 << 63) - 1))) + rows) + position
    return _shr(_mix(key), 11).double() * 2.0 ** -53


def _sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                 u: torch.Tensor) -> torch.Tensor:
    """logits: [B, V], u: [B] uniforms in [0, 1) -> token ids [B]: temperature, optional
    nucleus, inverse-CDF draw (the token whose CDF interval holds ``u``).

    Inverse-CDF sampling (one uniform per row, ``searchsorted`` on the cumulative
    probabilities) draws from the same distribution as ``torch.multinomial`` but
    costs one cumsum instead of one exponential variate per vocabulary entry,
    which is 15% of a CPU decode step with a 49k vocabulary.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)           # [B, V]
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        probs = probs * (probs.cumsum(-1) - probs < top_p)                # keeps the top token
    cdf = probs.cumsum(-1)                                                # [B, V]
    u = u.to(cdf.device, cdf.dtype)[:, None] * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)
    return idx if order is None else order.gather(-1, idx[:, None]).squeeze(-1)


@torch.inference_mode()
def sample(model, tokenizer, prompts: list[str], n: int, *, temperature: float = 1.0,
           top_p: float = 1.0, max_new_tokens: int = 64, seed: int = 0,
           stop_at_fence: bool = True, autocast_bf16: bool = False, chunk_rows: int = 0,
           prompt_keys: Sequence[int] | None = None) -> Samples:
    """Sample ``n`` completions for each rendered prompt.

    Args:
        prompts: P chat-rendered prompt strings (see ``models.format_chat``).
        n: samples per prompt (the GRPO group size G).
        seed: with the row keys, fixes every random draw; the same seed, model and
            prompts give the same completions, whatever ``chunk_rows``.
        autocast_bf16: run the forward under bfloat16 autocast (faster on CPUs
            with AMX/AVX512-BF16; slightly different numerics).
        chunk_rows: rows (of the P * n) decoded together; 0 = all of them. Memory,
            not math: the KV cache held is ``chunk_rows`` rows long.
        prompt_keys: one integer per prompt naming its random streams (default
            ``0..P-1``); sample j of a prompt with key k draws from stream
            ``k * n + j``. Callers that split one set of prompts over several calls
            (processes, evaluation batches) pass each prompt's global index, so the
            split does not change a completion.
    Returns:
        ``Samples`` with ``texts[P][n]``.
    """
    import time
    t0 = time.perf_counter()
    if chunk_rows < 0:
        raise ValueError(f"chunk_rows must be >= 0 (0 = all rows), got {chunk_rows}")
    keys = list(range(len(prompts))) if prompt_keys is None else [int(k) for k in prompt_keys]
    if len(keys) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(keys)} prompt_keys")
    B = len(prompts) * n
    chunk = chunk_rows or B
    backtick_ids = (_backtick_token_ids(tokenizer).to(model.device) if stop_at_fence
                    else None)
    out_ids: list[list[int]] = [[] for _ in range(B)]
    for start in range(0, B, chunk):
        rows = list(range(start, min(start + chunk, B)))
        _decode_rows(model, tokenizer, prompts, n, rows, keys, out_ids, temperature=temperature,
                     top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                     backtick_ids=backtick_ids, autocast_bf16=autocast_bf16)

    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in out_ids]
    if stop_at_fence:   # the fence may end inside a token: cut the text right after it
        texts = [_cut_after_block(t) for t in texts]
    return Samples(
        texts=[texts[i * n:(i + 1) * n] for i in range(len(prompts))],
        token_ids=[out_ids[i * n:(i + 1) * n] for i in range(len(prompts))],
        new_tokens=sum(len(ids) for ids in out_ids), seconds=time.perf_counter() - t0)


def decode_attention(device: torch.device):
    """The attention kernels a decode step may use: on CUDA, not cuDNN's.

    PyTorch's SDPA picks cuDNN's attention kernel on Hopper, which builds an
    execution plan for each new shape on the host. A decode step's key length
    grows by one every step, so every layer re-plans every step: on an H200
    (torch 2.11, Qwen3-4B, 128 rows) that was 1.3 ms of host time per call,
    47 ms of a 91 ms decode step (``scripts/gpu_step_check.py --decode-profile``).
    The flash and memory-efficient kernels take any shape at no planning cost;
    the math kernel stays as the fallback. Elsewhere a no-op.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH])


def _decode_rows(model, tokenizer, prompts: list[str], n: int, rows: list[int],
                 keys: list[int], out_ids: list[list[int]], *, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int, backtick_ids, autocast_bf16: bool) -> None:
    """Decode the flat rows ``rows`` (row = prompt * n + sample) into ``out_ids``.

    Each distinct prompt of the chunk is prefilled once and its KV cache is
    repeated for its rows (the prompt is the same for its whole group, so
    recomputing it per row is waste).
    """
    device = model.device
    eos = tokenizer.eos_token_id
    owners = sorted({r // n for r in rows})                              # prompts of this chunk
    local = torch.tensor([owners.index(r // n) for r in rows], device=device)   # [b]
    enc = tokenizer([prompts[i] for i in owners], return_tensors="pt", padding=True,
                    add_special_tokens=False).to(device)
    mask = enc.attention_mask                                            # [p, L0]
    position = (mask.cumsum(-1) - 1).clamp(min=0)                        # left padding aware
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16)
    decoder, head = model.get_decoder(), plain_head(model)
    with autocast:
        res = decoder(input_ids=enc.input_ids, attention_mask=mask, position_ids=position,
                      use_cache=True)
        logits = head_forward(head, res.last_hidden_state[:, -1])[local]  # [b, V]
    cache = res.past_key_values
    cache.batch_select_indices(local)                                    # [p] -> [b] rows
    buffer_cache(cache, room=max_new_tokens, dtype=torch.bfloat16 if autocast_bf16 else None)
    mask, position = mask[local], position[local]
    stream = torch.tensor([keys[r // n] * n + r % n for r in rows], device=device)  # [b]
    active = torch.tensor(rows, device=device)                           # flat row index
    next_pos = position[:, -1:] + 1                                      # [b, 1]
    for step in range(max_new_tokens):
        tok = _sample_next(logits, temperature, top_p, row_uniforms(seed, stream, step))  # [b]
        done = tok == eos
        tok_list = tok.tolist()
        for k, row in enumerate(active.tolist()):
            out_ids[row].append(tok_list[k])
        if backtick_ids is not None:
            maybe = torch.isin(tok, backtick_ids)
            for k in maybe.nonzero().flatten().tolist():
                text = tokenizer.decode(out_ids[active[k].item()], skip_special_tokens=True)
                if code_block_closed(text):
                    done[k] = True
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if bool(done.any()):                      # shrink the batch: drop finished rows
            keep = (~done).nonzero().flatten()
            active, stream, tok, next_pos, mask = (active[keep], stream[keep], tok[keep],
                                                   next_pos[keep], mask[keep])
            cache.batch_select_indices(keep)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        with autocast, decode_attention(device):
            res = decoder(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos,
                          past_key_values=cache, use_cache=True)
            logits = head_forward(head, res.last_hidden_state[:, -1])         # [b, V]
        next_pos = next_pos + 1


class BufferedLayer(DynamicLayer):
    """One layer's KV cache in a buffer with room for the rest of the decode.

    ``DynamicLayer`` appends each new token with ``torch.cat``, which copies the
    layer's whole cache at every decode step: 47% of a cpu-demo sampling phase
    in the profile. Here a step writes its token into the buffer
    ``[b, heads, n + room, d]`` and ``keys``/``values`` are views of the filled
    part ``[:, :, :n]``: the same values, so attention computes the same logits.

    ``dtype``: the buffer's dtype (default: the keys'). Under bf16 autocast the
    rotary embedding leaves the keys in float32 and attention casts the whole
    cache to bf16 at every step; a bf16 buffer holds those same bf16 values,
    cast once when each token is written.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int,
                 dtype: torch.dtype | None = None):
        super().__init__()
        b, h, n, d = keys.shape
        dtype = dtype or keys.dtype
        self._keys = keys.new_empty((b, h, n + room, d), dtype=dtype)
        self._values = values.new_empty((b, h, n + room, values.shape[-1]), dtype=dtype)
        self._keys[:, :, :n], self._values[:, :, :n] = keys, values
        self.n = n
        self.dtype, self.device, self.is_initialized = dtype, keys.device, True
        self._views()

    def _views(self) -> None:
        self.keys, self.values = self._keys[:, :, :self.n], self._values[:, :, :self.n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        q = key_states.shape[-2]
        if self.n + q > self._keys.shape[-2]:
            raise RuntimeError(f"KV buffer full: {self.n} + {q} tokens > room for "
                               f"{self._keys.shape[-2]}; pass a larger room to buffer_cache()")
        self._keys[:, :, self.n:self.n + q] = key_states
        self._values[:, :, self.n:self.n + q] = value_states
        self.n += q
        self._views()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._keys, self._values = self._keys[indices], self._values[indices]
        self._views()


def buffer_cache(cache, room: int, dtype: torch.dtype | None = None) -> None:
    """Give every layer of a prefilled ``DynamicCache`` a ``BufferedLayer`` with ``room``
    more tokens (in place; the cache object, and so the model's type checks, stay).

    Layer by layer, each old layer released before the next buffer is made: the
    cache is then at most its buffers plus one old layer, as the memory plan
    counts. Building all buffers while the old cache lived held both at once:
    a Qwen3-4B chunk of 129 rows peaked 2.4 GiB above the plan on an H200 with
    ~600-token prompts, and would have needed ~27 GiB more at 1,536-token prompts.
    """
    for j in range(len(cache.layers)):
        old = cache.layers[j]
        cache.layers[j] = BufferedLayer(old.keys, old.values, room, dtype)
        del old


def _cut_after_block(text: str) -> str:
    first = text.find(FENCE)
    if first < 0:
        return text
    second = text.find(FENCE, first + len(FENCE))
    return text if second < 0 else text[:second + len(FENCE)]
