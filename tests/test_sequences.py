"""Packing and chunked log-probabilities: equal to the full-logits computation."""

import pytest
import torch

from evil_moe.sequences import completion_logprobs, head_logprobs, pack_rollouts

PROMPTS = [[1, 20, 30, 40], [1, 50], [1, 7, 8]]
COMPLETIONS = [[60, 70], [80, 90, 100, 110], [5]]


def _full_logits_logprobs(model, ids, att, C):
    """The computation chunking replaces: every [B, C, V] logit at once."""
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=att, position_ids=pos).logits[:, -C - 1:-1].float()
    return logits.log_softmax(-1).gather(-1, ids[:, -C:, None]).squeeze(-1)


@pytest.mark.parametrize("chunk", [1, 3, 2048])
def test_chunked_logprobs_and_gradients_equal_full_logits(tiny, chunk):
    model, tok = tiny
    ids, att, comp, C = pack_rollouts(PROMPTS, COMPLETIONS, tok.pad_token_id)
    mask = comp[:, -C:]
    weight = model.get_decoder().layers[0].mlp.up_proj.weight
    weight.requires_grad_(True)
    try:
        ref = _full_logits_logprobs(model, ids, att, C)
        (g_ref,) = torch.autograd.grad((ref * mask).sum(), weight)
        got = completion_logprobs(model, ids, att, C, chunk_tokens=chunk)
        (g_got,) = torch.autograd.grad((got * mask).sum(), weight)
    finally:
        weight.requires_grad_(False)
    assert torch.allclose(got[mask.bool()], ref[mask.bool()], atol=1e-5)
    assert (got[~mask.bool()] == 0).all()
    assert (g_got - g_ref).norm() <= 1e-4 * g_ref.norm()          # 1e-4 relative


def test_head_logprobs_never_holds_more_than_a_chunk_of_logits():
    """The largest float32 tensor the head creates is [chunk, V], not [B, C, V]."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 1000, bias=False)
    hidden = torch.randn(4, 50, 8, requires_grad=True)
    targets = torch.randint(0, 1000, (4, 50))
    mask = torch.ones(4, 50)
    biggest = []

    def record(module, args, out):
        biggest.append(out.numel())
    handle = head.register_forward_hook(record)
    try:
        out = head_logprobs(head, hidden, targets, mask, chunk_tokens=16)
        out.sum().backward()                         # the backward recomputes chunk by chunk
    finally:
        handle.remove()
    assert max(biggest) == 16 * 1000
    assert len(biggest) == 2 * 13                    # 200 tokens: 13 chunks, forward + recompute
    full = head(hidden).float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    assert torch.allclose(out, full, atol=1e-6)


def test_head_logprobs_rejects_a_zero_chunk():
    head = torch.nn.Linear(2, 3)
    with pytest.raises(ValueError, match="chunk_tokens"):
        head_logprobs(head, torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long),
                      torch.ones(1, 1), chunk_tokens=0)


def test_prompt_prefix_is_read_not_grown(tiny):
    """A completion forward on a prompt prefix leaves the cache as it was (the
    memory plan counts the prefix, not every layer's [prompt + completion]
    keys and values), so reading it twice gives the packed rows' numbers twice."""
    from evil_moe.sequences import prefill_prompts, right_padded, score_completions
    model, tok = tiny
    owner = [0, 0, 1, 2]
    comps = [COMPLETIONS[0], [61, 71, 81], COMPLETIONS[1], COMPLETIONS[2]]
    with torch.no_grad():
        prefix = prefill_prompts(model, PROMPTS, owner, tok.pad_token_id)
        before = [(layer.keys.clone(), layer.values.clone()) for layer in prefix.cache.layers]
        Lp = prefix.cache.get_seq_length()
        c_ids, c_mask = right_padded(comps, tok.pad_token_id)
        first = score_completions(model, prefix, c_ids, c_mask)
        assert prefix.cache.get_seq_length() == Lp
        assert all(torch.equal(k, layer.keys) and torch.equal(v, layer.values)
                   for (k, v), layer in zip(before, prefix.cache.layers))
        again = score_completions(model, prefix, c_ids, c_mask)
        ids, att, comp, C = pack_rollouts([PROMPTS[o] for o in owner], comps, tok.pad_token_id)
        packed = completion_logprobs(model, ids, att, C)
    on = c_mask.bool()
    assert torch.equal(first, again)
    assert torch.allclose(first[on], packed[comp[:, -C:].bool()], atol=1e-5)
