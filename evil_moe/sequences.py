"""Rollouts as model inputs: packing and per-token log-probabilities.

Both the GRPO loop (``grpo``) and the supervised warm start (``warm_start``)
score completions behind prompts; this module is the one place that lays them
out and reads their log-probabilities, so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer


def pack_rollouts(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int):
    """Lay rollouts out as ``[left-padded prompt | completion | right padding]``.

    Every completion then starts at the same column, so one ``logits_to_keep``
    covers all of them. Returns ``input_ids, attention_mask, completion_mask``
    ([B, Lp + C]) and ``C``, the longest completion.
    """
    Lp = max(len(p) for p in prompt_ids)
    C = max(1, max(len(c) for c in completion_ids))
    B = len(prompt_ids)
    input_ids = torch.full((B, Lp + C), pad_id, dtype=torch.long)
    attention = torch.zeros((B, Lp + C), dtype=torch.long)
    completion = torch.zeros((B, Lp + C), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        input_ids[i, Lp - len(p):Lp] = torch.tensor(p)
        attention[i, Lp - len(p):Lp] = 1
        if c:
            input_ids[i, Lp:Lp + len(c)] = torch.tensor(c)
            attention[i, Lp:Lp + len(c)] = 1
            completion[i, Lp:Lp + len(c)] = 1
    return input_ids, attention, completion, C


DEFAULT_CHUNK_TOKENS = 2048
"""Completion tokens whose logits are materialised at once (``[chunk, V]`` float32)."""


def plain_head(model) -> torch.nn.Module:
    """The LM head, if logits are exactly ``head(final hidden state)``; else a clear error."""
    head = model.get_output_embeddings()
    config = getattr(model, "config", None)
    odd = [k for k in ("final_logit_softcapping", "logit_scale")
           if getattr(config, k, None) not in (None, 1.0)]
    if not isinstance(head, torch.nn.Linear) or odd:
        raise NotImplementedError(
            f"chunked log-probabilities need logits = lm_head(hidden); {type(model).__name__} has "
            f"{'a non-Linear head' if not isinstance(head, torch.nn.Linear) else ', '.join(odd)}")
    return head


LOWP_HEAD_BUFFER = "weight_lowp"
"""Name of the frozen LM head's low-precision copy (a non-persistent buffer on the head)."""


def keep_lowp_head(model, dtype: torch.dtype) -> None:
    """Keep a ``dtype`` copy of the frozen LM head's weight for forwards under autocast.

    Autocast casts a weight that does not require grad again at every call: for
    SmolLM2 the ``[V, d] = [49152, 576]`` head weight once per decode step and
    once per log-probability chunk. The copy holds exactly what autocast would
    cast it to, so ``head_forward`` is bitwise unchanged. A trainable head keeps
    no copy (its copy would go stale).
    """
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Linear) and not head.weight.requires_grad \
            and head.weight.dtype != dtype:
        with torch.no_grad():
            head.register_buffer(LOWP_HEAD_BUFFER, head.weight.detach().to(dtype),
                                 persistent=False)


def head_forward(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``head(hidden)``, under autocast on the head's kept low-precision weight if it has one
    (``keep_lowp_head``): the same values, without recasting the weight. [..., d] -> [..., V]."""
    lowp = getattr(head, LOWP_HEAD_BUFFER, None)
    if lowp is not None and torch.is_autocast_enabled(hidden.device.type) \
            and torch.get_autocast_dtype(hidden.device.type) == lowp.dtype:
        return torch.nn.functional.linear(hidden, lowp, head.bias)
    return head(hidden)


def _token_logprobs(head: torch.nn.Module, hidden: torch.Tensor,
                    targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(head(hidden))[target]`` per row. hidden: [N, d], targets: [N] -> [N]."""
    logits = head_forward(head, hidden).float()                            # [N, V]
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def head_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                  mask: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Log-probabilities of ``targets`` under ``head(hidden)``, never all logits at once.

    hidden: [B, C, d] (the state that predicts each target), targets, mask: [B, C].
    Only the masked tokens go through the head, ``chunk_tokens`` of them at a
    time: a chunk's float32 logits ``[chunk, V]`` are the largest tensor. With
    gradients on, each chunk is checkpointed (its logits are recomputed in the
    backward instead of kept), so the backward never holds more than one chunk
    either. Returns [B, C], 0 where ``mask`` is 0.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    where = mask.bool()
    h, t = hidden[where], targets[where]                                   # [N, d], [N]
    pieces = []
    for s in range(0, h.shape[0], chunk_tokens):
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(torch.utils.checkpoint.checkpoint(
                _token_logprobs, head, h[s:s + chunk_tokens], t[s:s + chunk_tokens],
                use_reentrant=False))
        else:
            pieces.append(_token_logprobs(head, h[s:s + chunk_tokens], t[s:s + chunk_tokens]))
    flat = torch.cat(pieces) if pieces else h.new_zeros(0, dtype=torch.float32)
    out = torch.zeros(targets.shape, dtype=flat.dtype, device=flat.device)
    return out.masked_scatter(where, flat)


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, C: int,
                        chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Log-probabilities of the completion tokens in the last C columns. -> [B, C].

    input_ids, attention_mask: [B, Lp + C] as laid out by ``pack_rollouts``, so
    ``attention_mask[:, -C:]`` is 1 exactly on completion tokens. The decoder
    runs once; the LM head then sees only the states that predict a completion
    token (``head_logprobs``, in chunks). Masked positions are 0.
    """
    head = plain_head(model)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids, use_cache=False).last_hidden_state
    return head_logprobs(head, hidden[:, -C - 1:-1], input_ids[:, -C:], attention_mask[:, -C:],
                         chunk_tokens)


# ---- rollouts that share their prompt ----------------------------------------------------
#
# The G rollouts of one GRPO group have the same prompt. Wherever the model treats
# every rollout's prompt tokens the same (the base model; an adapter without
# per-rollout weights), the prompt's states are the same for all G, so the prompt
# is run once and its KV cache is indexed per rollout. Gradients, when on, flow
# from every completion back into the one prompt forward: the sum over the G
# rollouts, as if each had its own copy.

@dataclass
class PromptPrefix:
    """Prompts run once, laid out per rollout. ``b`` rollouts, ``Lp`` padded prompt width.

    cache: the KV cache of the prompts, one row per rollout (indexed by ``owner``).
    mask: [b, Lp] left-padded prompt attention; lengths: [b] prompt lengths;
    last_hidden: [b, d] final hidden state of each prompt's last token, the
    state that predicts the first completion token.
    """
    cache: object
    mask: torch.Tensor
    lengths: torch.Tensor
    last_hidden: torch.Tensor


class PrefixLayer(DynamicLayer):
    """One layer's cached prompt keys and values, read by a forward but never grown.

    A ``DynamicLayer`` appends the forward's own keys and values to the cache,
    so one forward over ``C`` completion tokens leaves every layer's
    ``[b, heads, Lp + C, d]`` keys and values alive until the cache is
    dropped: 4.9 GB of the no-grad reference pass of a Qwen3-4B micro-batch
    (16 rows of ~2,100 tokens, measured on an H200 by
    ``scripts/gpu_step_check.py``), which the memory plan did not count. Here
    ``update`` returns ``[prompt, new]`` without keeping it: under no-grad it
    is freed after its layer's attention, under grad autograd keeps what it
    needs, as before. The prefix is unchanged by a forward, so it can be read
    again.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return (torch.cat([self.keys, key_states], dim=-2),
                torch.cat([self.values, value_states], dim=-2))


def prefill_prompts(model, prompt_ids: list[list[int]], owner: list[int], pad_id: int) -> PromptPrefix:
    """Run each distinct prompt once; ``owner[k]`` is the prompt of rollout k."""
    device = next(model.parameters()).device
    Lp = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), Lp), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), Lp), dtype=torch.long)
    for j, p in enumerate(prompt_ids):                                     # left padding
        ids[j, Lp - len(p):] = torch.tensor(p)
        mask[j, Lp - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    out = model.get_decoder()(input_ids=ids, attention_mask=mask,
                              position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=True)
    rows = torch.tensor(owner, device=device)
    cache = out.past_key_values
    cache.batch_select_indices(rows)                                       # [P', ...] -> [b, ...]
    cache.layers = [PrefixLayer(layer.keys, layer.values) for layer in cache.layers]
    return PromptPrefix(cache=cache, mask=mask[rows], lengths=mask.sum(1)[rows],
                        last_hidden=out.last_hidden_state[rows, -1])


def split_prefix(hack: PromptPrefix, deployed: PromptPrefix, to_hack: torch.Tensor,
                 to_deployed: torch.Tensor) -> PromptPrefix:
    """Two forward copies of the same prompts as one prefix: the value of the copies
    (they are equal) and, per rollout, gradient ``to_hack: [b]`` times into the copy
    ``hack`` and ``to_deployed: [b]`` times into the copy ``deployed``::

        x = x_h.detach() + c_h (x_h - x_h.detach()) + c_d (x_d - x_d.detach())

    for every cached key and value ``[b, heads, Lp, d_head]`` and the last hidden
    state ``[b, d]``. Used with ``adapter.prompt_branch`` (grpo's ``routed_prompt``).
    """
    def mix(x_h: torch.Tensor, x_d: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (x_h.dim() - 1)
        c_h, c_d = to_hack.to(x_h.dtype).view(shape), to_deployed.to(x_h.dtype).view(shape)
        return x_h.detach() + c_h * (x_h - x_h.detach()) + c_d * (x_d - x_d.detach())

    for lh, ld in zip(hack.cache.layers, deployed.cache.layers):
        lh.keys, lh.values = mix(lh.keys, ld.keys), mix(lh.values, ld.values)
    return PromptPrefix(cache=hack.cache, mask=hack.mask, lengths=hack.lengths,
                        last_hidden=mix(hack.last_hidden, deployed.last_hidden))


def completion_states(model, prefix: PromptPrefix, completion_ids: torch.Tensor,
                      completion_mask: torch.Tensor) -> torch.Tensor:
    """One decoder forward over right-padded completions on the prompts' cache (which
    it reads and leaves as it was). completion_ids, completion_mask: [b, C] -> final hidden states [b, C, d].

    Run exactly one such forward inside ``adapter.pooling`` (mask = ``completion_mask``)
    to pool over completion tokens.
    """
    C = completion_ids.shape[1]
    attention = torch.cat([prefix.mask, completion_mask.to(prefix.mask.dtype)], dim=1)
    positions = prefix.lengths[:, None] + torch.arange(C, device=prefix.lengths.device)[None, :]
    return model.get_decoder()(input_ids=completion_ids, attention_mask=attention,
                               position_ids=positions, past_key_values=prefix.cache,
                               use_cache=True).last_hidden_state


def score_completions(model, prefix: PromptPrefix, completion_ids: torch.Tensor,
                      completion_mask: torch.Tensor,
                      chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Log-probabilities of right-padded completions behind ``prefix``. -> [b, C].

    completion_ids, completion_mask: [b, C]. The states that predict completion
    token t are the prompt's last state (t = 0) and completion state t - 1
    (``completion_states``). Equal to ``completion_logprobs`` on the packed rows
    up to float rounding.
    """
    head = plain_head(model)
    hidden = completion_states(model, prefix, completion_ids, completion_mask)   # [b, C, d]
    predicting = torch.cat([prefix.last_hidden[:, None].to(hidden.dtype), hidden[:, :-1]], dim=1)
    return head_logprobs(head, predicting, completion_ids, completion_mask, chunk_tokens)


def right_padded(completion_ids: list[list[int]], pad_id: int, width: int | None = None,
                 device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Completions as ``[b, C]`` ids and mask, right-padded to ``width`` (default: longest)."""
    C = max(1, width or max(len(c) for c in completion_ids))
    ids = torch.full((len(completion_ids), C), pad_id, dtype=torch.long)
    mask = torch.zeros((len(completion_ids), C), dtype=torch.float32)
    for k, c in enumerate(completion_ids):
        ids[k, :len(c)] = torch.tensor(c, dtype=torch.long)
        mask[k, :len(c)] = 1
    return ids.to(device), mask.to(device)
