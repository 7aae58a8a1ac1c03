"""The memory plan and the time estimate of a run, computed from shapes before anything loads.

``plan(cfg, memory_bytes)`` returns the peak memory of each phase of a GRPO
step, by component, and the sampling chunk it chooses so that every phase fits;
``check(cfg, ...)`` (called by ``grpo.setup`` before the model loads) raises
one ``MemoryPlanError`` saying what to change when it cannot fit.
``python -m evil_moe plan --preset qwen3-4b --gpu-memory-gb 80`` prints it.

Notation (bytes): ``n`` layers, ``h`` hidden size, ``a = heads * head_dim``,
``k = kv_heads * head_dim``, ``I`` MLP width, ``V`` vocabulary; ``e`` the bytes
of an activation (2 for bfloat16 weights or autocast, else 4); ``T = b * L``
tokens of a micro-batch of ``b`` rows of ``L = max_prompt_tokens +
max_new_tokens`` (``pack_rollouts`` pads every row to the longest prompt and
the longest completion, so the plan takes both at their caps).

Resident in every phase:

- base weights (``dtype``), the embedding counted once when tied;
- adapter ``A: [2r, d_in], B: [d_out, 2r]`` per target module in float32, the
  frozen copies ``A0, B0`` (same size), AdamW's two moments (2x).

Phases (the step's peak is the largest):

1. **sample**, per chunk of ``c`` rows: ``merged()`` holds a second copy of every
   adapted weight; the KV cache ``c * L * 2 n k e`` (Qwen3-4B: 147 KB a
   token), plus one layer's prefilled cache while ``rollout.buffer_cache`` moves it
   into its buffer; per decode step
   the logits ``[c, V]`` and three float32 copies (scaled, softmax, CDF).
2. **reference** (no grad, ``b`` rows): the larger of one layer's transient
   (at ``down_proj``: its input ``I e``, the pooling's float32 copy of it
   ``4 I``, the residual stream ``3 h e``, per token) and the LM head's (one
   log-probability chunk ``[chunk, V]`` float32 with its ``exp``), plus the 4-D
   attention mask ``b L^2`` (bool); with ``share_prompt_forward``, the prompts'
   KV cache laid out per rollout ``b * max_prompt_tokens * 2 n k e`` and one
   layer's ``[prompt + completion]`` keys and values (``sequences.PrefixLayer``
   keeps no more).
3. **train** (grad, ``b`` rows): the gradients of the adapter (float32) and
   the activations autograd saves. Per token and layer it saves
   (``activation_bytes``): the RMSNorms' float32 inputs ``2 * 4 h`` (and
   Qwen3's q/k norms ``4 (a + k)``), the float32 input of each adapter matmul
   (``4 (3h + a + 2h + I)``, shared when the model is float32), SDPA's q, k, v,
   out ``4 a e`` (HF repeats k, v to every head before SDPA when a mask is given)
   and the MLP's gate, up and SiLU outputs ``3 I e``. With
   ``gradient_checkpointing`` only each layer's input ``h e`` is kept per layer,
   and one layer at a time is recomputed in the backward. The backward of the LM head holds one chunk's recomputed logits
   and their gradient (``3 * 4 V`` a token).

Checked against a measurement without a GPU (``scripts/measure_step_memory.py``:
the real Qwen3-4B architecture under ``FakeTensorMode``): within 12% per phase;
and on one H200 capped at 79.6 GiB (``scripts/gpu_step_check.py``, random
weights, one full step, ~560-token prompts): sampling 73.9 GiB measured against
71.4 planned (the headroom took it; ``buffer_cache`` then held the whole
prefilled cache beside its buffers, fixed since), training 25.2 against 32.6;
the reference pass 16.3 against 12.0, from the completion keys and values the
prompt cache kept (fixed since: ``sequences.PrefixLayer``; the plan now counts
the prompt cache). Not yet measured again after those two fixes.

Headroom: the budget is ``HEADROOM`` of the memory (the CUDA context,
allocator fragmentation and, on CPU, everything else on the machine).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .config import RunConfig

GiB = 1024 ** 3
HEADROOM = 0.9                   # share of the device memory the plan may use
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class MemoryPlanError(RuntimeError):
    """The run cannot fit; the message says what to change."""


# ---- model shapes -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Arch:
    """What the plan needs of a decoder-only transformer, read from its HF config."""
    name: str
    n_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qk_norm: bool                # Qwen3 normalises q and k per head

    @classmethod
    def from_hf(cls, name: str, c) -> "Arch":
        heads = c.num_attention_heads
        return cls(name=name, n_layers=c.num_hidden_layers, hidden=c.hidden_size, heads=heads,
                   kv_heads=c.num_key_value_heads,
                   head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
                   intermediate=c.intermediate_size, vocab=c.vocab_size,
                   tied=bool(c.tie_word_embeddings), qk_norm=c.model_type.startswith("qwen3"))

    @property
    def attn(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """``(d_in, d_out)`` of each adapted Linear of one layer."""
        h, a, k, i = self.hidden, self.attn, self.kv, self.intermediate
        return {"q_proj": (h, a), "k_proj": (h, k), "v_proj": (h, k), "o_proj": (a, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_params(self) -> int:
        """Weights of the Linears inside the decoder layers (what ``merged()`` copies)."""
        return self.n_layers * sum(i * o for i, o in self.module_dims().values())

    def params(self) -> int:
        norms = self.n_layers * (2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0))
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.linear_params() + norms + self.hidden + embed

    def kv_bytes_per_token(self, e: int) -> int:
        """K and V of every layer for one token: ``2 n k e`` (Qwen3-4B bf16: 147,456)."""
        return 2 * self.n_layers * self.kv * e


def qwen3_4b_config():
    """transformers' ``Qwen3Config`` of Qwen/Qwen3-4B, from its published config (offline)."""
    from transformers import Qwen3Config
    return Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                       num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
                       rope_theta=1000000.0, tie_word_embeddings=True, attention_bias=False,
                       bos_token_id=151643, eos_token_id=151645)


def hf_config(model: str):
    """The HF config of a registry name or hub id, without loading weights."""
    from .models import SMOLLM2, TINY_RANDOM, tiny_random_config
    if model == TINY_RANDOM:
        return tiny_random_config(49152)           # the SmolLM2 tokenizer's vocabulary
    if model == SMOLLM2:
        from transformers import LlamaConfig     # SmolLM2-135M-Instruct's published config
        return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                           num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                           head_dim=64, tie_word_embeddings=True)
    if model == "Qwen/Qwen3-4B":
        return qwen3_4b_config()
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise MemoryPlanError(f"the memory plan needs the config of {model!r}, which is not in "
                              f"the local cache ({type(e).__name__}); download it first "
                              f"(`huggingface-cli download {model} config.json`)") from None


# ---- the plan -------------------------------------------------------------------------------

def activation_bytes(arch: Arch, e: int) -> int:
    """Bytes autograd saves per token in one decoder layer (see the module docstring)."""
    h, a, k, i = arch.hidden, arch.attn, arch.kv, arch.intermediate
    norms = 2 * 4 * h + (4 * (a + k) if arch.qk_norm else 0)
    adapter_inputs = 4 * (3 * h + a + 2 * h + i) if e != 4 else 4 * (h + a + h + i)
    sdpa = 4 * a * e                                # q, k, v (repeated to a), out
    mlp = 3 * i * e
    return norms + adapter_inputs + sdpa + mlp


@dataclass
class Phase:
    name: str
    parts: dict[str, int] = field(default_factory=dict)     # component -> bytes

    @property
    def total(self) -> int:
        return sum(self.parts.values())


@dataclass
class Plan:
    arch: Arch
    memory: int                      # the device's (or machine's) memory, bytes
    budget: int                      # what the plan may use: HEADROOM * memory
    processes: int
    rows: int                        # rollouts per process per step
    seq_len: int                     # L = max_prompt_tokens + max_new_tokens
    micro_batch: int
    logprob_chunk: int
    sample_chunk_rows: int           # chosen (or set in the config)
    gradient_checkpointing: bool
    phases: list[Phase]
    problems: list[str]              # what does not fit, with the fix; empty when it fits

    @property
    def peak(self) -> int:
        return max(p.total for p in self.phases)

    @property
    def fits(self) -> bool:
        return not self.problems

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)

    def report(self) -> str:
        def gb(b: int) -> str:
            return f"{b / GiB:8.2f}"

        lines = [f"memory plan: {self.arch.name}, {self.processes} process(es), "
                 f"{self.rows} rollouts per process, L = {self.seq_len} tokens a row",
                 f"  device memory {self.memory / GiB:.1f} GiB, budget {self.budget / GiB:.1f} "
                 f"GiB ({HEADROOM:.0%})",
                 f"  chosen: sample_chunk_rows={self.sample_chunk_rows}, micro_batch_size="
                 f"{self.micro_batch}, logprob_chunk_tokens={self.logprob_chunk}, "
                 f"gradient_checkpointing={self.gradient_checkpointing}"]
        for p in self.phases:
            lines.append(f"  phase {p.name:<9} peak {gb(p.total)} GiB")
            lines += [f"    {k:<44}{gb(v)}" for k, v in p.parts.items()]
        lines.append(f"  step peak {self.peak / GiB:.2f} GiB of {self.budget / GiB:.1f} GiB: "
                     + ("fits" if self.fits else "does NOT fit"))
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def _resident(cfg: RunConfig, arch: Arch) -> dict[str, int]:
    targets = [m for m in arch.module_dims() if m in cfg.target_modules]
    adapter = arch.n_layers * sum(2 * cfg.rank * sum(arch.module_dims()[m]) for m in targets)
    parts = {"base weights": arch.params() * DTYPE_BYTES[cfg.dtype],
             "adapter A, B (float32)": 4 * adapter,
             "frozen copies A0, B0": 4 * adapter,
             "AdamW moments (2x adapter)": 8 * adapter}
    if cfg.bf16_autocast and cfg.dtype != "bfloat16":    # ExpertAdapter.cast_frozen_weights
        parts["bf16 copy of the wrapped weights"] = arch.linear_params() * 2
    return parts


def _act_bytes(cfg: RunConfig) -> int:
    return 2 if cfg.bf16_autocast or cfg.dtype != "float32" else 4


def phases(cfg: RunConfig, arch: Arch, chunk_rows: int, micro_batch: int,
           logprob_chunk: int, checkpointing: bool) -> list[Phase]:
    """The three phases' peaks by component for these chunk sizes."""
    e, L, n, V = _act_bytes(cfg), cfg.max_prompt_tokens + cfg.max_new_tokens, arch.n_layers, \
        arch.vocab
    h, i = arch.hidden, arch.intermediate
    res = _resident(cfg, arch)
    adapter = res["adapter A, B (float32)"]
    kv_token = arch.kv_bytes_per_token(e)          # all layers' keys and values, a token
    kv = chunk_rows * L * kv_token
    sample = Phase("sample", dict(res))
    sample.parts["merged weight copies"] = arch.linear_params() * (
        DTYPE_BYTES[cfg.dtype] + (2 if "bf16 copy of the wrapped weights" in res else 0))
    sample.parts[f"KV cache ({chunk_rows} rows x {L} tokens)"] = kv + kv // n
    sample.parts["decode logits [rows, V] + 3 float32 copies"] = chunk_rows * V * (e + 12)

    T = micro_batch * L
    chunk = min(logprob_chunk, micro_batch * cfg.max_new_tokens)
    mask = micro_batch * L * L
    ref = Phase("reference", dict(res))
    layer = T * (i * (e + 4) + 3 * h * e)       # down_proj's input, its float32 copy (pooling)
    head = T * h * e + chunk * V * 8            # final states, one chunk's logits and its exp
    ref.parts[f"larger of one layer / logprob chunk [{chunk}, V]"] = max(layer, head)
    ref.parts["attention mask [b, 1, L, L]"] = mask
    if cfg.share_prompt_forward:       # sequences.prefill_prompts: the prompt KV, one row a rollout
        ref.parts["prompt KV cache (b rows)"] = micro_batch * (
            cfg.max_prompt_tokens * kv_token + L * kv_token // n)

    train = Phase("train", dict(res))
    train.parts["adapter gradients (float32)"] = adapter
    per_layer = T * activation_bytes(arch, e)
    if checkpointing:
        train.parts["checkpointed layer inputs"] = n * T * h * e
        train.parts["one layer recomputed"] = per_layer
    else:
        train.parts[f"saved activations ({n} layers)"] = n * per_layer
    if cfg.training_attention == "eager":   # float32 softmax output + its cast, per layer
        probs = micro_batch * arch.heads * L * L * (4 + e)
        train.parts["eager attention probabilities"] = probs * (1 if checkpointing else n)
    train.parts["final norm + head input"] = T * h * (4 + 2 * e)
    train.parts["attention mask [b, 1, L, L]"] = mask
    train.parts["backward working set"] = max(chunk * V * 12, T * (3 * i * e + 4 * h))
    return [sample, ref, train]


def rows_per_process(cfg: RunConfig, processes: int) -> int:
    return cfg.prompts_per_step // processes * cfg.group_size


def plan(cfg: RunConfig, memory: int, processes: int = 1) -> Plan:
    """The plan of ``cfg`` on a device of ``memory`` bytes, ``processes`` data-parallel processes.

    ``sample_chunk_rows = 0`` in the config lets the plan choose the largest
    chunk that fits (at most the rows of a process); every other size is the
    config's, checked.
    """
    arch = Arch.from_hf(cfg.model, hf_config(cfg.model))
    budget = int(HEADROOM * memory)
    rows = rows_per_process(cfg, processes)
    mb = min(cfg.micro_batch_size, rows)
    ck = cfg.gradient_checkpointing

    def sample_peak(c: int) -> int:
        return phases(cfg, arch, c, mb, cfg.logprob_chunk_tokens, ck)[0].total

    chunk = min(cfg.sample_chunk_rows or rows, rows)
    if not cfg.sample_chunk_rows:
        while chunk > 1 and sample_peak(chunk) > budget:
            chunk -= 1
    ph = phases(cfg, arch, chunk, mb, cfg.logprob_chunk_tokens, ck)
    problems = []
    sample, ref, train = ph
    if sample.total > budget:
        fix = ("lower sample_chunk_rows (0 lets the plan choose)" if cfg.sample_chunk_rows > 1
               else "lower max_new_tokens or max_prompt_tokens, use a smaller model or dtype, "
                    "or a device with more memory")
        problems.append(f"sampling needs {sample.total / GiB:.1f} GiB with {chunk} row(s) per "
                        f"chunk: {fix}")
    for p in (ref, train):
        if p.total <= budget:
            continue
        fixes = []
        fit_mb = max((b for b in range(1, mb) if
                      phases(cfg, arch, chunk, b, cfg.logprob_chunk_tokens, ck)[2].total <= budget
                      and phases(cfg, arch, chunk, b, cfg.logprob_chunk_tokens, ck)[1].total
                      <= budget), default=0)
        if fit_mb:
            fixes.append(f"lower micro_batch_size to {fit_mb}")
        if not ck and p.name == "train":
            fixes.append("enable gradient_checkpointing")
        fixes.append("lower max_new_tokens or max_prompt_tokens")
        if fit_mb == 0:     # more data-parallel GPUs would not help: each holds the whole model
            fixes.append("use a device with more memory (FSDP is not wired in)")
        problems.append(f"the {p.name} phase needs {p.total / GiB:.1f} GiB with micro_batch_size="
                        f"{mb}: " + ", or ".join(fixes))
    return Plan(arch=arch, memory=memory, budget=budget, processes=processes, rows=rows,
                seq_len=cfg.max_prompt_tokens + cfg.max_new_tokens, micro_batch=mb,
                logprob_chunk=cfg.logprob_chunk_tokens, sample_chunk_rows=chunk,
                gradient_checkpointing=ck, phases=ph, problems=problems)


def device_memory(device_type: str, index: int = 0) -> int:
    """Total memory of the CUDA device, or of the machine (RAM) for CPU."""
    if device_type == "cuda":
        import torch
        return torch.cuda.get_device_properties(index).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check(cfg: RunConfig, device_type: str, processes: int, index: int = 0) -> Plan:
    """The plan on this device; raises ``MemoryPlanError`` (what to change) when it cannot fit."""
    p = plan(cfg, device_memory(device_type, index), processes)
    if not p.fits:
        where = "GPU" if device_type == "cuda" else "RAM"
        raise MemoryPlanError(
            f"preset {cfg.preset!r} ({cfg.model}) does not fit in {p.memory / GiB:.0f} GiB of "
            f"{where}: " + "; ".join(p.problems) + ". See `python -m evil_moe plan --preset "
            f"{cfg.preset}`.")
    return p


# ---- time estimate ---------------------------------------------------------------------------

H100_BF16_DENSE = 989e12          # FLOP/s, H100 SXM bf16 dense peak
H100_HBM = 3.35e12                # bytes/s, H100 SXM HBM3
# Calibrated on one measured full-shape step (scripts/gpu_step_check.py: an H200, whose
# bf16 peak is the H100's, torch 2.11; book: reproduce/scale). It ran the reference pass
# and training at 20% of this peak (an earlier assumption was 35%), and an eager decode
# step of 128 rows took 45 ms, host-bound (1,100 kernel launches; 91 ms before
# rollout.decode_attention kept decoding off cuDNN's attention; 10 ms was assumed).
TRAIN_MFU = 0.20                  # share of the bf16 peak: reference, training, prefill
DECODE_BANDWIDTH_SHARE = 0.6      # assumed share of HBM bandwidth one decode step achieves
DECODE_STEP_FLOOR_S = 0.045       # measured: the host time of one eager decode step


@dataclass
class TimeEstimate:
    gpus: int
    prompt_tokens: int               # mean prompt length assumed
    completion_tokens: int           # mean completion length assumed
    decode_s: float
    prefill_s: float
    train_s: float
    flops: dict

    @property
    def step_s(self) -> float:
        return self.decode_s + self.prefill_s + self.train_s

    def report(self, steps: int) -> str:
        return (f"  {self.gpus} x H100: decode {self.decode_s:5.1f} s + prefill "
                f"{self.prefill_s:4.1f} s + reference/train {self.train_s:5.1f} s = "
                f"{self.step_s:5.1f} s a step; {steps} steps = {self.step_s * steps / 3600:.2f} h")


def estimate_time(cfg: RunConfig, gpus: int, prompt_tokens: int, completion_tokens: int,
                  chunk_rows: int) -> TimeEstimate:
    """An estimate, not a measurement, of one step on ``gpus`` H100s (data parallel).

    - reference pass, training forward, backward, adapter (``step_flops``), plus one
      more training forward under gradient checkpointing: FLOPs at ``TRAIN_MFU``
      of the bf16 dense peak; the prompt prefill likewise;
    - decoding: a chunk runs ``max_new_tokens`` steps (its longest row runs to
      the cap). On the GPU every step reads the weights once (``max_new_tokens *
      W`` bytes a chunk) and each row reads its KV cache once per token it
      generates (``(p c + c^2 / 2) * kv`` bytes for a row of ``p`` prompt and
      ``c`` completion tokens), at ``DECODE_BANDWIDTH_SHARE`` of HBM bandwidth;
      on the host every step costs ``DECODE_STEP_FLOOR_S`` (an eager PyTorch
      decode step launches ~30 kernels per layer). The two overlap, so a chunk
      takes the larger; measured, the host's is (45 ms against ~16 ms).
    """
    arch = Arch.from_hf(cfg.model, hf_config(cfg.model))
    e, p, c = _act_bytes(cfg), prompt_tokens, completion_tokens
    shape = ModelShape.from_arch(arch, cfg.target_modules)
    rows = rows_per_process(cfg, gpus)
    fl = step_flops(shape, [(p, c)] * rows, 2 * cfg.rank)
    recompute = fl["train_fwd"] if cfg.gradient_checkpointing else 0
    rate = TRAIN_MFU * H100_BF16_DENSE
    train_s = (fl["ref"] + fl["train_fwd"] + fl["train_bwd"] + fl["adapter"] + recompute) / rate
    weights = (arch.linear_params() + arch.vocab * arch.hidden) * DTYPE_BYTES[cfg.dtype]
    bandwidth = DECODE_BANDWIDTH_SHARE * H100_HBM
    kv_row = (p * c + c * c / 2) * arch.kv_bytes_per_token(e)      # bytes a row reads
    decode_s = 0.0
    for start in range(0, rows, chunk_rows):       # the GPU's reads overlap the host's steps
        r = min(chunk_rows, rows - start)
        decode_s += max(cfg.max_new_tokens * DECODE_STEP_FLOOR_S,
                        (cfg.max_new_tokens * weights + r * kv_row) / bandwidth)
    prompts = cfg.prompts_per_step // gpus
    prefill = 2 * shape.n_linear * p + 4 * arch.n_layers * arch.attn * p * p / 2   # a prompt
    prefill_s = prompts * prefill / rate
    return TimeEstimate(gpus=gpus, prompt_tokens=p, completion_tokens=c, decode_s=decode_s,
                        prefill_s=prefill_s, train_s=train_s, flops=fl)


# ---- FLOP count (also used by benchmarks/grpo_step.py) --------------------------------------

@dataclass
class ModelShape:
    """What the FLOP count needs from a decoder-only model (read before any adapter is attached)."""
    n_linear: int                    # N: weights of the nn.Linear layers inside the decoder layers
    lm_head: int                     # H: d_model * vocab
    n_layers: int
    d_att: int                       # heads * head_dim
    lora_dims: int                   # sum over target modules of (d_in + d_out)

    @classmethod
    def of(cls, model, target_modules) -> "ModelShape":
        """From a loaded model (counts its actual nn.Linear weights)."""
        from peft import LoraConfig
        from peft.tuners.tuners_utils import check_target_module_exists
        from torch import nn
        cfg = model.config.get_text_config()
        layers = model.get_decoder().layers
        n_linear = sum(m.weight.numel() for m in layers.modules() if isinstance(m, nn.Linear))
        head = model.get_output_embeddings().weight
        match = LoraConfig(r=1, target_modules=list(target_modules))
        lora_dims = sum(m.in_features + m.out_features for name, m in model.named_modules()
                        if isinstance(m, nn.Linear) and name
                        and check_target_module_exists(match, name))
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(n_linear=n_linear, lm_head=head.numel(), n_layers=cfg.num_hidden_layers,
                   d_att=heads * head_dim, lora_dims=lora_dims)

    @classmethod
    def from_arch(cls, arch: Arch, target_modules) -> "ModelShape":
        """From the shapes alone (no model): the same numbers as ``of`` for these models."""
        dims = arch.module_dims()
        return cls(n_linear=arch.linear_params(), lm_head=arch.vocab * arch.hidden,
                   n_layers=arch.n_layers, d_att=arch.attn,
                   lora_dims=arch.n_layers * sum(sum(dims[m]) for m in dims
                                                 if m in target_modules))


def _tri(a: int, b: int) -> int:
    """sum_{t=a..b} t (0 when b < a)."""
    return 0 if b < a else (a + b) * (b - a + 1) // 2


def step_flops(shape: ModelShape, rows: list[tuple[int, int]], rank_total: int) -> dict:
    """Model FLOPs of one GRPO step from per-rollout ``(prompt_len, completion_len)``
    (the derivation is in benchmarks/grpo_step.py's docstring)."""
    N, H, att = shape.n_linear, shape.lm_head, 4 * shape.n_layers * shape.d_att
    lora = 2 * rank_total * shape.lora_dims
    gen = ref = fwd = bwd = adapter = 0
    for p, c in rows:
        L = p + c
        gen += 2 * N * (L - 1) + att * _tri(1, L - 1) + 2 * H * c
        full = 2 * N * L + att * _tri(1, L) + 2 * H * c
        ref += full
        fwd += full
        bwd += 2 * N * L + 2 * att * _tri(1, L) + 2 * H * c
        adapter += 3 * lora * L
    total = gen + ref + fwd + bwd + adapter
    return {"gen": gen, "ref": ref, "train_fwd": fwd, "train_bwd": bwd, "adapter": adapter,
            "total": total, "gen_phase": gen, "train_phase": ref + fwd + bwd + adapter}


def executed_step_flops(shape: ModelShape, rows: list[tuple[int, int]], rank_total: int,
                        group_size: int, shared_ref: bool, shared_train: bool) -> dict:
    """The FLOPs our loop actually executes, where :func:`step_flops` counts every row whole.

    ``rows`` come grouped by prompt, ``group_size`` at a time. Sampling prefills
    each prompt once (``rollout.sample``); with ``shared_ref`` the reference pass
    runs each prompt once and its completions on the cache, and with
    ``shared_train`` (vanilla) the training forward, backward and adapter do too
    (the oracle's second prefix per group, for its other label, and the second copy
    of ``routed_prompt: group_mean`` are not counted).
    A completion token at position t still attends over all t keys.
    """
    N, H, att = shape.n_linear, shape.lm_head, 4 * shape.n_layers * shape.d_att
    lora = 2 * rank_total * shape.lora_dims
    gen = ref = fwd = bwd = adapter = 0
    for g in range(0, len(rows), group_size):
        group = rows[g:g + group_size]
        p = group[0][0]
        prompt = 2 * N * p + att * _tri(1, p)                       # one prompt forward
        gen += prompt + sum(2 * N * (c - 1) + att * _tri(p + 1, p + c - 1) + 2 * H * c
                            for _, c in group)
        whole = [2 * N * (p + c) + att * _tri(1, p + c) + 2 * H * c for _, c in group]
        on_cache = [2 * N * c + att * _tri(p + 1, p + c) + 2 * H * c for _, c in group]
        ref += prompt + sum(on_cache) if shared_ref else sum(whole)
        if shared_train:
            fwd += prompt + sum(on_cache)
            bwd += 2 * prompt + sum(2 * N * c + 2 * att * _tri(p + 1, p + c) + 2 * H * c
                                    for _, c in group)
            adapter += 3 * lora * (p + sum(c for _, c in group))
        else:
            fwd += sum(whole)
            bwd += sum(2 * N * (p + c) + 2 * att * _tri(1, p + c) + 2 * H * c for _, c in group)
            adapter += 3 * lora * sum(p + c for _, c in group)
    total = gen + ref + fwd + bwd + adapter
    return {"gen": gen, "ref": ref, "train_fwd": fwd, "train_bwd": bwd, "adapter": adapter,
            "total": total, "gen_phase": gen, "train_phase": ref + fwd + bwd + adapter}
