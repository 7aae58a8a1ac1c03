import torch

from evil_moe.models import format_chat
import pytest

from evil_moe.rollout import _cut_after_block, _sample_next, code_block_closed, row_uniforms, sample


def test_code_block_closed():
    assert not code_block_closed("Here you go:\n```python\ndef f(): pass\n")
    assert code_block_closed("```python\ndef f(): pass\n```")
    assert not code_block_closed("no code at all")


def test_cut_after_block_drops_the_chatter():
    text = "Sure.\n```python\nx = 1\n```\nThis sets x."
    assert _cut_after_block(text) == "Sure.\n```python\nx = 1\n```"
    assert _cut_after_block("```python\nopen") == "```python\nopen"


def test_sampler_matches_the_softmax_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(20000, 1)
    draws = _sample_next(logits, 1.0, 1.0, row_uniforms(0, torch.arange(20000), 0))
    freq = torch.bincount(draws, minlength=3).float() / draws.numel()
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.015), freq


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).repeat(5000, 1)
    draws = _sample_next(logits, 1.0, 0.7, row_uniforms(1, torch.arange(5000), 3))
    assert set(draws.tolist()) == {0, 1}            # 0.6 < 0.7, so token 1 is in, token 2 out


def _prompts(tok):
    return [format_chat(tok, [{"role": "user", "content": q}])
            for q in ("hi", "write a function that adds two numbers please")]


def test_low_temperature_sampling_equals_hf_greedy_with_left_padding(tiny):
    model, tok = tiny
    prompts = _prompts(tok)
    s = sample(model, tok, prompts, 1, temperature=1e-5, max_new_tokens=8, stop_at_fence=False)
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ref = model.generate(**enc, max_new_tokens=8, do_sample=False)
    for i in range(2):
        expected = ref[i, enc.input_ids.shape[1]:].tolist()
        got = s.token_ids[i][0]
        assert got == expected[:len(got)] and len(got) >= 1


def test_sampling_is_seeded_and_grouped(tiny):
    model, tok = tiny
    prompts = _prompts(tok)
    a = sample(model, tok, prompts, 3, max_new_tokens=6, seed=5, stop_at_fence=False)
    b = sample(model, tok, prompts, 3, max_new_tokens=6, seed=5, stop_at_fence=False)
    c = sample(model, tok, prompts, 3, max_new_tokens=6, seed=6, stop_at_fence=False)
    assert len(a.texts) == 2 and all(len(g) == 3 for g in a.texts)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    assert a.new_tokens == sum(len(t) for g in a.token_ids for t in g)


def test_row_uniforms_are_uniform_and_independent_of_the_batch():
    rows = torch.arange(50000)
    u = row_uniforms(7, rows, 0)
    assert u.min() >= 0 and u.max() < 1
    hist = torch.histc(u.float(), bins=10, min=0, max=1) / u.numel()
    assert torch.allclose(hist, torch.full((10,), 0.1), atol=0.006), hist
    # neighbouring rows, positions and seeds are uncorrelated
    for other in (row_uniforms(7, rows + 1, 0), row_uniforms(7, rows, 1), row_uniforms(8, rows, 0)):
        assert abs(torch.corrcoef(torch.stack([u, other]))[0, 1]) < 0.02
    # a row's draw does not depend on which other rows are drawn with it
    assert torch.equal(row_uniforms(7, rows[[5, 17, 40000]], 0), u[[5, 17, 40000]])


def _long_prompts(tok):
    return [format_chat(tok, [{"role": "user", "content": q}])
            for q in ("hi", "write a function that adds two numbers please", "sort a list")]


@pytest.mark.parametrize("chunk_rows", [1, 2, 4])
def test_completions_do_not_depend_on_the_chunk_size_at_temperature_1(tiny, chunk_rows):
    """Per-row streams: the same seed gives the same completions for 1, 2, 4 and all
    rows per chunk, at temperature 1, although rows end at different steps (EOS)."""
    model, tok = tiny
    prompts = _long_prompts(tok)
    eos_bias = torch.zeros(len(tok))
    eos_bias[tok.eos_token_id] = 9.0   # p(EOS) ~ 15% a step: rows end at different steps
    head = model.get_output_embeddings()
    old_bias = head.bias
    head.bias = torch.nn.Parameter(eos_bias, requires_grad=False)
    try:
        ref = sample(model, tok, prompts, 3, temperature=1.0, max_new_tokens=12, seed=11,
                     stop_at_fence=False)
        got = sample(model, tok, prompts, 3, temperature=1.0, max_new_tokens=12, seed=11,
                     stop_at_fence=False, chunk_rows=chunk_rows)
    finally:
        head.bias = old_bias
    lengths = {len(t) for g in ref.token_ids for t in g}
    assert len(lengths) > 2, lengths                # rows did finish at different steps
    assert got.token_ids == ref.token_ids
    assert got.texts == ref.texts


def test_prompt_keys_make_a_split_of_the_prompts_reproduce_the_whole(tiny):
    """Two calls with the prompts' global indices as keys give the completions of one call.
    In float64: float32 matmuls of different batch shapes round differently on some CPUs
    (seen on an AVX2-only one), which can flip a sampled token; the keys are under test."""
    import copy
    model, tok = copy.deepcopy(tiny[0]).double(), tiny[1]
    prompts = _long_prompts(tok)
    whole = sample(model, tok, prompts, 2, temperature=1.0, max_new_tokens=10, seed=3,
                   stop_at_fence=False)
    first = sample(model, tok, prompts[:1], 2, temperature=1.0, max_new_tokens=10, seed=3,
                   stop_at_fence=False)
    rest = sample(model, tok, prompts[1:], 2, temperature=1.0, max_new_tokens=10, seed=3,
                  stop_at_fence=False, prompt_keys=[1, 2])
    unkeyed = sample(model, tok, prompts[1:], 2, temperature=1.0, max_new_tokens=10, seed=3,
                     stop_at_fence=False)
    assert first.token_ids + rest.token_ids == whole.token_ids
    assert unkeyed.token_ids != whole.token_ids[1:]     # the keys are what makes it match


def test_evaluation_streams_do_not_depend_on_prompts_per_batch(tiny):
    """evaluate.generate at temperature 1: each sample's stream is (seed, prompt, sample),
    so the same seed and weights give the same completions however prompts are batched
    (and so ON, OFF and base draw the same streams)."""
    from evil_moe.evaluate import generate
    model, tok = tiny
    prompts = _long_prompts(tok)
    kw = dict(temperature=1.0, max_new_tokens=8, seed=4, progress=False)
    a = generate(model, tok, prompts, 2, prompts_per_batch=1, **kw)
    b = generate(model, tok, prompts, 2, prompts_per_batch=3, **kw)
    c = generate(model, tok, prompts, 2, prompts_per_batch=2, **{**kw, "seed": 5})
    assert a == b
    assert a[1] != c[1]


def _decode_logits(model, ids, mask, steps, *, buffered, autocast):
    """Logits of a prefill and ``steps`` greedy decode steps, on the cache kind asked for."""
    from evil_moe.rollout import buffer_cache
    logits = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, attention_mask=mask, use_cache=True,
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        cache = out.past_key_values
        if buffered:
            buffer_cache(cache, room=steps, dtype=torch.bfloat16 if autocast else None)
        pos = mask.sum(-1, keepdim=True)
        for t in range(steps):
            logits.append(out.logits[:, -1].float())
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            if t == 1:                                 # a row finishes: the batch shrinks
                keep = torch.tensor([0, 2])
                cache.batch_select_indices(keep)
                tok, mask, pos = tok[keep], mask[keep], pos[keep]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            out = model(input_ids=tok, attention_mask=mask, position_ids=pos,
                        past_key_values=cache, use_cache=True)
            pos = pos + 1
    return logits


@pytest.mark.parametrize("autocast", [False, True])
def test_buffered_kv_cache_gives_the_dynamic_caches_logits_bit_for_bit(tiny, autocast):
    """The decode loop's preallocated cache (written in place, bf16 under autocast) holds
    the values the growing cache holds, or that attention casts it to: equal logits."""
    model, tok = tiny
    enc = tok([format_chat(tok, [{"role": "user", "content": q}]) for q in
               ("hi", "write a function that adds two numbers please", "sort a list")],
              return_tensors="pt", padding=True, add_special_tokens=False)
    grow = _decode_logits(model, enc.input_ids, enc.attention_mask, 5, buffered=False,
                          autocast=autocast)
    buf = _decode_logits(model, enc.input_ids, enc.attention_mask, 5, buffered=True,
                         autocast=autocast)
    assert len(buf) == 5 and all(torch.equal(a, b) for a, b in zip(grow, buf))


def test_buffered_kv_cache_refuses_to_overflow(tiny):
    from evil_moe.rollout import BufferedLayer
    layer = BufferedLayer(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4), room=1)
    layer.update(torch.ones(2, 1, 1, 4), torch.ones(2, 1, 1, 4))
    assert layer.get_seq_length() == 4 and layer.keys[:, :, 3].eq(1).all()
    with pytest.raises(RuntimeError, match="KV buffer full"):
        layer.update(torch.ones(2, 1, 1, 4), torch.ones(2, 1, 1, 4))


def test_buffer_cache_releases_each_old_layer_before_the_next_buffer(monkeypatch):
    """At most one old layer is alive while a buffer is made (the plan counts the
    buffers plus one layer), not the whole prefilled cache beside the buffers."""
    import weakref

    from transformers import DynamicCache

    from evil_moe import rollout
    cache = DynamicCache()
    for j in range(4):
        cache.update(torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4), j)
    old = [weakref.ref(layer.keys) for layer in cache.layers]
    alive_at_build = []
    built = rollout.BufferedLayer.__init__

    def counting_init(self, *args, **kwargs):
        alive_at_build.append(sum(r() is not None for r in old))
        built(self, *args, **kwargs)

    monkeypatch.setattr(rollout.BufferedLayer, "__init__", counting_init)
    rollout.buffer_cache(cache, room=2)
    assert alive_at_build == [4, 3, 2, 1]       # layer j's own old keys, and the ones after it
    assert all(isinstance(layer, rollout.BufferedLayer) for layer in cache.layers)


def test_low_precision_head_is_autocasts_head_bit_for_bit(tiny):
    """keep_lowp_head's bf16 copy gives what autocast computes from the float32 weight,
    and nothing changes outside autocast."""
    import copy

    from evil_moe.sequences import LOWP_HEAD_BUFFER, head_forward, keep_lowp_head
    model = copy.deepcopy(tiny[0])
    head = model.get_output_embeddings()
    hidden = torch.randn(5, head.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = head(hidden)
    keep_lowp_head(model, torch.bfloat16)
    assert getattr(head, LOWP_HEAD_BUFFER).dtype == torch.bfloat16
    assert LOWP_HEAD_BUFFER not in model.state_dict().keys() | head.state_dict().keys()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(head_forward(head, hidden), ref)
    assert torch.equal(head_forward(head, hidden), head(hidden))
