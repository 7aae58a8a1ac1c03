"""Measure the peak memory of each phase of one full-shape GRPO step without a GPU.

The real architecture (transformers' ``Qwen3ForCausalLM`` with Qwen3-4B's
``Qwen3Config``, random weights, bfloat16) runs under torch's
``FakeTensorMode``: every tensor has its real shape, dtype and lifetime but no
data, so nothing is computed and nothing is allocated. A dispatch mode
(``_LiveBytes``, after torch's ``MemTracker``) counts the bytes of every live
storage, as the caching allocator would hold them, and keeps the peak. The
phases run the library's own code paths:

- **train**: the adapter attached (``ExpertAdapter``), ``grpo.checkpoint_decoder_layers``
  when the config asks for it, a router-like ``w`` under ``soft_weight``,
  ``sequences.completion_logprobs`` (chunked LM head) over a micro-batch of
  ``micro_batch_size`` rows of ``max_prompt_tokens + max_new_tokens`` tokens,
  then the backward (outside the soft-weight context, as ``train_step`` does);
  AdamW's two moments are allocated beside the parameters.
- **reference**: with no grad, adapter disabled, pooling on: with
  ``share_prompt_forward`` (the preset's) one prompt per group of rows
  (``sequences.prefill_prompts``) and the completions on its cache, as grpo
  runs it; else the packed forward.
- **sample**: ``adapter.merged(hack=True)`` (the second copy of the weights),
  a ``DynamicCache`` filled to ``L - 1`` tokens for a chunk of
  ``sample_chunk_rows`` rows (the plan's choice), one decode step and one
  ``rollout._sample_next`` draw.

Then it prints each phase's measured peak beside the plan's
(``evil_moe.memory_plan``). It does not see the CUDA context or allocator
fragmentation (the plan's ``HEADROOM``), nor kernel workspaces.

    python scripts/measure_step_memory.py                    # qwen3-4b preset
    python scripts/measure_step_memory.py --set micro_batch_size=4 gradient_checkpointing=false
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import weakref

import torch
import yaml
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from evil_moe import grpo, memory_plan
from evil_moe.adapter import ExpertAdapter
from evil_moe.config import load_preset
from evil_moe.models import DTYPES
from evil_moe.rollout import _sample_next, row_uniforms
from evil_moe.sequences import completion_logprobs, prefill_prompts, score_completions

GiB = memory_plan.GiB


class _LiveBytes(TorchDispatchMode):
    """Bytes of live storages, and their peak, over every op run inside it.

    Each op's outputs are registered by storage (views share one); a storage
    leaves when its Python object dies, which PyTorch ties to the storage's own
    lifetime. (torch's ``MemTracker`` does the same but also tracks modules, and
    refuses a module that runs twice, as every layer does under checkpointing.)
    """

    def __init__(self, *external: torch.Tensor):
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.now = self.peak = 0
        for t in external:
            self._add(t)

    def _add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self.sizes:
            return
        self.sizes[key] = st.nbytes()
        self.now += st.nbytes()
        self.peak = max(self.peak, self.now)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._add, out)
        return out


def _peak(fn, *external: torch.Tensor) -> int:
    """Peak bytes of live storages while ``fn`` runs, counting ``external`` as already live."""
    with _LiveBytes(*external) as tracker:
        fn()
    return tracker.peak


@contextlib.contextmanager
def _dense_masks():
    """FakeTensorMode cannot run data-dependent shapes (boolean indexing, ``nonzero``).
    The measurement masks every completion token in, so ``hidden[mask]`` is
    ``hidden.reshape(-1, d)`` (the same [N, d] copy) and the scatter back is a view:
    ``sequences.head_logprobs`` runs with those two ops replaced (its chunking and
    checkpointing unchanged), and the pooling sink skips its empty-row check."""
    from evil_moe import adapter as adapter_mod, sequences

    def head_logprobs(head, hidden, targets, mask, chunk_tokens=sequences.DEFAULT_CHUNK_TOKENS):
        h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        pieces = []
        for s in range(0, h.shape[0], chunk_tokens):
            if torch.is_grad_enabled() and h.requires_grad:
                pieces.append(torch.utils.checkpoint.checkpoint(
                    sequences._token_logprobs, head, h[s:s + chunk_tokens],
                    t[s:s + chunk_tokens], use_reentrant=False))
            else:
                pieces.append(sequences._token_logprobs(head, h[s:s + chunk_tokens],
                                                        t[s:s + chunk_tokens]))
        return torch.cat(pieces).view(targets.shape)

    def pooled_init(self, mask, num_modules):
        self.mask, self.counts = mask.float(), mask.float().sum(1)
        self._slots = [None] * num_modules

    saved = sequences.head_logprobs, adapter_mod.PooledFeatures.__init__
    sequences.head_logprobs, adapter_mod.PooledFeatures.__init__ = head_logprobs, pooled_init
    try:
        yield
    finally:
        sequences.head_logprobs, adapter_mod.PooledFeatures.__init__ = saved


def measure(cfg, chunk_rows: int) -> dict[str, int]:
    from transformers import AutoModelForCausalLM
    hf = memory_plan.hf_config(cfg.model)
    dtype = DTYPES[cfg.dtype]
    L, C, b = cfg.max_prompt_tokens + cfg.max_new_tokens, cfg.max_new_tokens, cfg.micro_batch_size
    # A fused attention kernel, as on a GPU: it keeps q, k, v, the output and the
    # log-sum-exp, never the [b, heads, L, L] scores (torch's CPU flash kernel takes masks).
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with FakeTensorMode(allow_non_fake_inputs=True), _dense_masks(), \
            sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        model = AutoModelForCausalLM.from_config(hf, dtype=dtype).eval().requires_grad_(False)
        adapter = ExpertAdapter.from_config(model, cfg)
        if cfg.gradient_checkpointing:
            grpo.checkpoint_decoder_layers(model, adapter)
        moments = [torch.zeros_like(p) for p in adapter.parameters() for _ in range(2)]
        ids = torch.randint(0, hf.vocab_size, (b, L))
        attn = torch.ones(b, L, dtype=torch.long)
        completion = torch.zeros(b, L)
        completion[:, -C:] = 1
        live = (*model.parameters(), *model.buffers(), *moments)
        peaks = {}

        def train():
            w = torch.full((b,), 0.5, requires_grad=True)
            with adapter.soft_weight(w):
                logp = completion_logprobs(model, ids, attn, C, cfg.logprob_chunk_tokens)
            (logp * attn[:, -C:]).sum().backward()

        def reference():
            if not cfg.share_prompt_forward:
                with torch.no_grad(), adapter.disable(), adapter.pooling(completion) as pooled:
                    completion_logprobs(model, ids, attn, C, cfg.logprob_chunk_tokens)
                return pooled.features
            # grpo's path: one prompt per group of rows, its cache laid out per rollout,
            # the completions on it (sequences.PrefixLayer keeps no more)
            Lp = cfg.max_prompt_tokens
            prompts = [[1] * Lp] * max(1, b // cfg.group_size)
            owner = [min(k // cfg.group_size, len(prompts) - 1) for k in range(b)]
            c_ids, c_mask = ids[:, :C], torch.ones(b, C)
            with torch.no_grad(), adapter.disable():
                prefix = prefill_prompts(model, prompts, owner, 0)
                with adapter.pooling(c_mask) as pooled:
                    score_completions(model, prefix, c_ids, c_mask, cfg.logprob_chunk_tokens)
            return pooled.features

        def sample():
            from transformers import DynamicCache
            kv, hd = hf.num_key_value_heads, getattr(hf, "head_dim", None)
            hd = hd or hf.hidden_size // hf.num_attention_heads
            act = torch.bfloat16 if cfg.bf16_autocast else dtype
            with torch.no_grad(), adapter.merged(hack=True):
                cache = DynamicCache(config=hf)
                for layer in range(hf.num_hidden_layers):
                    cache.update(torch.zeros(chunk_rows, kv, L - 1, hd, dtype=act),
                                 torch.zeros(chunk_rows, kv, L - 1, hd, dtype=act), layer)
                tok = torch.zeros(chunk_rows, 1, dtype=torch.long)
                out = model(input_ids=tok, attention_mask=torch.ones(chunk_rows, L,
                                                                     dtype=torch.long),
                            position_ids=torch.full((chunk_rows, 1), L - 1),
                            past_key_values=cache, use_cache=True)
                u = row_uniforms(0, torch.arange(chunk_rows), 0)
                _sample_next(out.logits[:, -1], cfg.temperature, cfg.top_p, u)

        for name, fn in (("sample", sample), ("reference", reference), ("train", train)):
            t0 = time.perf_counter()
            peaks[name] = _peak(fn, *live)
            print(f"  measured {name}: {peaks[name] / GiB:.2f} GiB "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
            for p in adapter.parameters():
                p.grad = None
    return peaks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen3-4b")
    ap.add_argument("--gpu-memory-gb", type=float, default=80.0)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--tolerance", type=float, default=0.15,
                    help="exit 1 when a phase's plan is further than this from the measurement")
    args = ap.parse_args(argv)
    overrides = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.set)}
    cfg = load_preset(args.preset, **overrides)
    plan = memory_plan.plan(cfg, int(args.gpu_memory_gb * GiB))
    print(f"{cfg.model}: micro_batch_size={plan.micro_batch}, L={plan.seq_len}, "
          f"sample_chunk_rows={plan.sample_chunk_rows}, gradient_checkpointing="
          f"{plan.gradient_checkpointing}, dtype={cfg.dtype}")
    measured = measure(cfg, plan.sample_chunk_rows)
    worst = 0.0
    print(f"  {'phase':<10}{'plan GiB':>10}{'measured GiB':>14}{'plan/measured':>15}")
    for name, m in measured.items():
        p = plan.phase(name).total
        worst = max(worst, abs(p / m - 1))
        print(f"  {name:<10}{p / GiB:>10.2f}{m / GiB:>14.2f}{p / m:>15.3f}")
    step_m = max(measured.values())
    print(f"  {'step peak':<10}{plan.peak / GiB:>10.2f}{step_m / GiB:>14.2f}"
          f"{plan.peak / step_m:>15.3f}")
    ok = worst <= args.tolerance
    print(f"  largest phase difference {worst:.1%} ({'within' if ok else 'OUTSIDE'} "
          f"{args.tolerance:.0%})")
    return 0 if ok else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
