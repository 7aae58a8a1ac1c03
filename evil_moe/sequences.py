"""Rollouts as model inputs: packing and per-token log-probabilities.

Both the GRPO loop (``grpo``) and the supervised warm start (``warm_start``)
score completions behind prompts; this module is the one place that lays them
out and reads their log-probabilities, so neither imports the other.
"""

from __future__ import annotations

import torch


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


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        C: int) -> torch.Tensor:
    """Log-probabilities of the last C columns' tokens. -> [B, C].

    Only the C positions that predict completion tokens go through the LM head
    (``logits_to_keep``), which saves the head's cost on every prompt token.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=C + 1).logits[:, :-1].float()            # [B, C, V]
    targets = input_ids[:, -C:]
    return logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)
