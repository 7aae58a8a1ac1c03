"""The two-expert adapter: a rank-2r LoRA whose two halves are a deployed and a hack expert.

Every target Linear ``y = W x + b`` becomes a :class:`TwoExpertLinear`. It holds
trainable ``A: [2r, d_in]``, ``B: [d_out, 2r]`` and frozen copies ``A0, B0`` of
their Gaussian init. Rows/columns ``[:r]`` are the **deployed** expert, ``[r:]``
the **hack** expert (DESIGN.md section 4)::

    y = W x + b + s * (B_d A_d x - B0_d A0_d x)  +  w * s * (B_h A_h x - B0_h A0_h x)
        s = alpha / r

Subtracting the frozen copies makes the net delta exactly zero at init while
both factors are non-zero, so gradients are alive from step one. Resetting the
hack block to ``(A0_h, B0_h)`` removes it exactly (net zero), which is how the
hack expert is ablated.

Soft weight (one ``w`` in [0, 1] per rollout, ``ExpertAdapter.soft_weight``):
the hack output is multiplied by ``w`` (``w`` keeps its gradient, so the router
learns from the policy loss); the deployed output keeps its value while the
gradient of its parameters ``A_d, B_d`` is multiplied by ``1 - w``. ``w = 0``
is the deployment forward and trains only the deployed expert; ``w = 1`` trains
only the hack expert. Generation uses both experts at full strength.

Scale: ``s = alpha / r`` with the per-expert rank ``r`` (not ``2r``), the same
for both experts. Each expert alone is then an ordinary rank-r LoRA with PEFT's
default scaling, and the deployed model (hack expert removed) is exactly a
standard rank-r LoRA; adding the hack expert does not shrink the deployed one.

Implementation: one factorisation covers both subtractions,
``B A - B0 A0 = B (A - A0) + (B - B0) A0``. Per expert ``e`` the wrapper stacks
``[A_e - A0_e; A0_e]`` into ``A_cat: [4r, d_in]`` and ``[B_e, B_e - B0_e]`` into
``B_cat: [d_out, 4r]``, so the forward is one thin matmul ``z = x A_cat^T``
([B, L, 4r]) and one ``delta = z B_cat^T`` fused into the output. At init both
``A - A0`` and ``B - B0`` are exact zeros, so the delta is exactly 0.0, not
merely small.

What is from PEFT and what is by hand: target-module matching uses PEFT's own
rule (``LoraConfig`` + ``check_target_module_exists``: a module matches when its
name equals a target or ends with ``.<target>``; a string is a regex), so
``target_modules`` means what it means for every PEFT LoRA. The layer is
written by hand because nothing in PEFT's ``LoraLayer`` has a frozen init that
is subtracted, two blocks with different roles, a per-row weight that scales
one block's output and the other block's *gradient*, or pooled bottleneck
capture inside the forward.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import TARGET_MODULES
from .sequences import keep_lowp_head

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "evil_moe.two_expert_lora/1"


class PooledFeatures:
    """Receives the pooled deployed bottleneck of every module during one forward.

    ``mask: [B, L]`` is 1 on the tokens to average over (completion tokens).
    After the forward, ``features`` is ``[B, M, r]``: per module ``m``, the mean
    over masked tokens of ``h = A[:r] x``. Detached; only ``[B, r]`` per module
    is kept.
    """

    def __init__(self, mask: Tensor, num_modules: int):
        if mask.dim() != 2:
            raise ValueError(f"pooling mask must be [B, L], got shape {tuple(mask.shape)}")
        self.mask = mask.float()
        self.counts = self.mask.sum(1)  # [B]
        empty = (self.counts == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"pooling mask has no tokens in row(s) {empty}: nothing to average")
        self._slots: list[Tensor | None] = [None] * num_modules

    def add(self, index: int, h: Tensor) -> None:
        """Pool ``h: [B, L, r]`` of module ``index`` over the masked tokens."""
        if h.shape[:2] != self.mask.shape:
            raise ValueError(f"pooling mask is {tuple(self.mask.shape)} but module {index} saw "
                             f"input [B, L] = {tuple(h.shape[:2])}; run exactly one full-sequence "
                             "forward inside pooling()")
        mask = self.mask.to(h.device, h.dtype)
        self._slots[index] = torch.einsum("blr,bl->br", h.detach(), mask) / self.counts.to(
            h.device, h.dtype)[:, None]

    @property
    def features(self) -> Tensor:
        """``[B, M, r]`` pooled deployed bottleneck, module order of ``adapter.module_names``."""
        missing = [i for i, s in enumerate(self._slots) if s is None]
        if missing:
            raise RuntimeError(f"no pooled features for {len(missing)} module(s) (first: index "
                               f"{missing[0]}); run the model forward inside the pooling() context")
        return torch.stack(self._slots, dim=1)  # type: ignore[arg-type]


class TwoExpertLinear(nn.Module):
    """A frozen ``nn.Linear`` plus the two-expert delta. See the module docstring.

    Modes are plain attributes set by :class:`ExpertAdapter`'s context managers:
    ``w`` (per-row soft weight ``[B]`` or None), ``branch`` (a shared prompt copy:
    hack scale ``[B]`` and the block that trains, or None), ``pool`` (a
    :class:`PooledFeatures` or None), ``disabled`` and ``merged`` (skip the adapter math).
    """

    def __init__(self, base: nn.Linear, rank: int, scale: float, index: int, A: Tensor, B: Tensor):
        super().__init__()
        self.base, self.r, self.scale, self.index = base, rank, scale, index
        device = base.weight.device
        # Adapter weights stay float32 even on a bf16 model (small Adam updates survive);
        # a float64 model (exactness tests) keeps float64.
        dtype = torch.float64 if base.weight.dtype == torch.float64 else torch.float32
        self.A = nn.Parameter(A.to(device, dtype))  # [2r, d_in]
        self.B = nn.Parameter(B.to(device, dtype))  # [d_out, 2r]
        self.register_buffer("A0", self.A.detach().clone(), persistent=False)
        self.register_buffer("B0", self.B.detach().clone(), persistent=False)
        self.w: Tensor | None = None
        self.pool: PooledFeatures | None = None
        self.disabled = False
        self.merged = False
        self.branch: tuple[Tensor, str] | None = None  # (hack scale [B], block that trains)
        self.base_lowp: Tensor | None = None  # the frozen weight, cast once (see cast_frozen_weights)

    def stacked(self, trains: str | None = None) -> tuple[Tensor, Tensor]:
        """``A_cat: [4r, d_in]`` and ``s * B_cat: [d_out, 4r]``, columns grouped
        ``[deployed (2r) | hack (2r)]``; ``B_cat @ A_cat = s (B A - B0 A0)``.
        ``trains='deployed'`` or ``'hack'``: the other block's factors are detached."""
        r, A, A0, B, B0 = self.r, self.A, self.A0, self.B, self.B0
        if trains == "hack":
            A, B = torch.cat([A[:r].detach(), A[r:]]), torch.cat([B[:, :r].detach(), B[:, r:]], 1)
        elif trains == "deployed":
            A, B = torch.cat([A[:r], A[r:].detach()]), torch.cat([B[:, :r], B[:, r:].detach()], 1)
        A_cat = torch.cat([A[:r] - A0[:r], A0[:r], A[r:] - A0[r:], A0[r:]])
        B_cat = torch.cat([B[:, :r], B[:, :r] - B0[:, :r], B[:, r:], B[:, r:] - B0[:, r:]], 1)
        return A_cat, self.scale * B_cat

    def delta_weight(self, hack: bool = True) -> Tensor:
        """``s (B A - B0 A0)``: [d_out, d_in]; ``hack=False`` keeps the deployed block only."""
        A_cat, B_cat = self.stacked()
        k = 4 * self.r if hack else 2 * self.r
        return B_cat[:, :k] @ A_cat[:k]

    def _base_forward(self, x: Tensor) -> Tensor:
        """The frozen Linear. Under autocast, with the weight already in the autocast
        dtype, so it is not cast again on every call (bit-identical to casting it)."""
        if self.base_lowp is not None and torch.is_autocast_enabled(x.device.type) \
                and torch.get_autocast_dtype(x.device.type) == self.base_lowp.dtype:
            return F.linear(x, self.base_lowp, self.base.bias)
        return self.base(x)

    def forward(self, x: Tensor) -> Tensor:
        """``x: [B, L, d_in]`` -> ``[B, L, d_out]``."""
        y = self._base_forward(x)
        r = self.r
        if self.disabled or self.merged:  # base weights only (merged: W already holds the delta)
            if self.pool is not None:
                xa = x if torch.is_autocast_enabled(x.device.type) else x.to(self.A.dtype)
                self.pool.add(self.index, xa @ self.A[:r].T)
            return y
        A_cat, B_cat = self.stacked(None if self.branch is None else self.branch[1])
        if self.w is not None:  # frozen twin of the deployed A_d - A0_d rows, see _soft_weight
            A_cat = torch.cat([A_cat, A_cat[:r].detach()])
        # (under autocast the matmul runs in bf16 anyway: casting x up first would only copy it)
        xa = x if torch.is_autocast_enabled(x.device.type) else x.to(A_cat.dtype)
        z = xa @ A_cat.T  # [B, L, 4r] = [u_d, h0_d | u_h, h0_h] (+ twin of u_d)
        if self.pool is not None:  # deployed bottleneck A_d x = (A_d - A0_d) x + A0_d x
            self.pool.add(self.index, z[..., :r] + z[..., r:2 * r])
        if self.branch is not None:  # a shared prompt copy (ExpertAdapter.prompt_branch)
            hack_scale = self.branch[0].to(z.dtype).view(-1, 1, 1)             # [B, 1, 1]
            z = torch.cat([z[..., :2 * r], z[..., 2 * r:] * hack_scale], -1)
        elif self.w is not None:
            z, B_cat = self._soft_weight(z, B_cat, self.w)
        # LoRA delta, both experts: y + s (B A - B0 A0) x, fused into one matmul-add.
        out = torch.addmm(y.reshape(-1, y.shape[-1]), z.reshape(-1, z.shape[-1]).to(y.dtype),
                          B_cat.T.to(y.dtype))
        return out.view(y.shape)

    def _soft_weight(self, z: Tensor, B_cat: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        """Per-row soft routing: ``z: [B, L, 5r]`` (4r + twin), ``w: [B]``
        -> ``z: [B, L, 6r]``, ``B_cat: [d_out, 6r]``.

        hack:     output times w; w keeps its gradient (the router learns through it).
        deployed: output keeps its value; the gradient of its parameters A_d, B_d is
                  scaled by (1 - w) per row. The gradient flowing *through* it to earlier
                  layers is left whole, so w = 0.3 gives exactly 0.7x the w = 0 gradient
                  in every layer (DESIGN's ``(1-w)*dep + w*dep.detach()`` read literally
                  would also cut that path and break the 0.7x in multi-layer models).
        Trick, on both factors: ``(1-w)*v + w*v_twin`` where the twin has the same value
        but is computed from detached parameters: same value, parameter gradient x(1-w).
        """
        if w.shape != (z.shape[0],):
            raise ValueError(f"soft weight w must be [B] = [{z.shape[0]}], got {tuple(w.shape)}")
        r = self.r
        w = w.to(z.dtype).view(-1, *([1] * (z.dim() - 1)))  # [B, 1, 1]
        wd = w.detach()
        u_d = z[..., :r] * (1 - wd) + z[..., 4 * r:] * wd     # A side: twin from detached A_d
        dep = torch.cat([u_d, z[..., r:2 * r]], -1)            # [B, L, 2r] deployed bottleneck
        z = torch.cat([dep * (1 - wd), dep * wd, z[..., 2 * r:4 * r] * w], -1)
        B_dep = B_cat[:, :2 * r]                                # B side: twin from detached B_d
        return z, torch.cat([B_dep, B_dep.detach(), B_cat[:, 2 * r:]], 1)


class ExpertAdapter:
    """The two-expert adapter on a model: attach, modes, save and load.

    ``module_names`` fixes the module order ``m`` of every ``[..., M, r]`` tensor.
    Modes are context managers; they restore the previous state on exit, so they
    nest (``pooling`` inside ``disable``, ``ablate_hack_expert`` inside
    ``soft_weight``, ...). ``merged`` cannot be combined with ``soft_weight``.
    """

    def __init__(self, model: nn.Module, layers: list[TwoExpertLinear], names: list[str],
                 rank: int, alpha: float, target_modules: Sequence[str] | str,
                 init_std: float, seed: int):
        self.model, self.layers, self.module_names = model, layers, names
        self.rank, self.alpha, self.init_std, self.seed = rank, alpha, init_std, seed
        self.target_modules = target_modules if isinstance(target_modules, str) else list(
            target_modules)
        self.scale = alpha / rank

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def attach(cls, model: nn.Module, rank: int, alpha: float = 16.0,
               target_modules: Sequence[str] | str = TARGET_MODULES, init_std: float = 0.02,
               seed: int = 0) -> "ExpertAdapter":
        """Replace every target ``nn.Linear`` of ``model`` (in place) by a TwoExpertLinear.

        ``A, B`` are Gaussian with std ``init_std`` drawn from a generator seeded
        with ``seed`` in module order (the global RNG is untouched).
        """
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if alpha <= 0 or init_std <= 0:
            raise ValueError(f"alpha and init_std must be > 0, got {alpha}, {init_std}")
        if any(isinstance(m, TwoExpertLinear) for m in model.modules()):
            raise RuntimeError("model already has an ExpertAdapter attached; call remove() first")
        match = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules)
        names = [n for n, _ in model.named_modules() if n and check_target_module_exists(match, n)]
        if not names:
            raise ValueError(f"no module of {type(model).__name__} matches target_modules="
                             f"{target_modules!r}")
        gen = torch.Generator().manual_seed(seed)
        layers = []
        for i, name in enumerate(names):
            base = model.get_submodule(name)
            if type(base) is not nn.Linear:
                raise TypeError(f"target module {name} is {type(base).__name__}, not nn.Linear")
            A = torch.randn(2 * rank, base.in_features, generator=gen) * init_std
            B = torch.randn(base.out_features, 2 * rank, generator=gen) * init_std
            layer = TwoExpertLinear(base, rank, alpha / rank, i, A, B)
            model.set_submodule(name, layer)
            layers.append(layer)
        return cls(model, layers, names, rank, alpha, target_modules, init_std, seed)

    @classmethod
    def from_config(cls, model: nn.Module, cfg) -> "ExpertAdapter":
        """Attach with a RunConfig's ``rank, lora_alpha, target_modules, init_std, seed``;
        under ``bf16_autocast`` the frozen weights are also kept in bfloat16."""
        adapter = cls.attach(model, rank=cfg.rank, alpha=cfg.lora_alpha,
                             target_modules=tuple(cfg.target_modules), init_std=cfg.init_std,
                             seed=cfg.seed)
        if cfg.bf16_autocast:
            adapter.cast_frozen_weights(torch.bfloat16)
        return adapter

    def cast_frozen_weights(self, dtype: torch.dtype) -> None:
        """Keep a ``dtype`` copy of each wrapped frozen weight, and of the frozen LM head's
        (``sequences.keep_lowp_head``), for forwards under autocast.

        Autocast casts only tensors that require grad once per region; a frozen
        float32 weight is cast again at every matmul, which measured 27% of a
        CPU step's post-sampling time. The copy holds exactly the values autocast
        would produce, so every result is bitwise unchanged; outside autocast the
        float32 weight is used as before. Costs one extra copy of the weights.
        """
        with torch.no_grad():
            for layer in self.layers:
                if layer.base.weight.dtype != dtype:
                    layer.base_lowp = layer.base.weight.detach().to(dtype)
        keep_lowp_head(self.model, dtype)     # the LM head is frozen too (not wrapped)

    def remove(self) -> None:
        """Put the original ``nn.Linear`` modules back; the adapter is unusable afterwards."""
        for name, layer in zip(self.module_names, self.layers):
            self.model.set_submodule(name, layer.base)
        self.layers = []

    # ---- parameters ---------------------------------------------------------------------

    def parameters(self) -> list[nn.Parameter]:
        """Every trainable tensor: ``[A, B]`` per module, in module order."""
        return [p for layer in self.layers for p in (layer.A, layer.B)]

    def deployed_features(self, input_means: list[Tensor]) -> Tensor:
        """``[N, M, r]`` pooled deployed bottleneck from per-module input means
        (``pooled_inputs``): ``h[:, m] = mean_x[m] @ A_m[:r]^T``. Detached."""
        if len(input_means) != len(self.layers):
            raise ValueError(f"need {len(self.layers)} modules' input means, got {len(input_means)}")
        with torch.no_grad():
            return torch.stack([xm.to(layer.A) @ layer.A[:self.rank].T
                                for xm, layer in zip(input_means, self.layers)], dim=1)

    def grad_norms(self) -> dict[str, float]:
        """L2 norms of the gradients of the deployed ``[:r]`` and hack ``[r:]`` blocks."""
        r, dep, hack = self.rank, [], []
        for layer in self.layers:
            if layer.A.grad is not None:
                dep.append(layer.A.grad[:r].square().sum())
                hack.append(layer.A.grad[r:].square().sum())
            if layer.B.grad is not None:
                dep.append(layer.B.grad[:, :r].square().sum())
                hack.append(layer.B.grad[:, r:].square().sum())
        if not dep:
            return {"deployed": 0.0, "hack": 0.0}
        d, h = torch.stack(dep).sum().sqrt(), torch.stack(hack).sum().sqrt()
        return dict(zip(("deployed", "hack"), torch.stack([d, h]).tolist()))

    def state_dict(self) -> dict[str, Tensor]:
        """``{"<module>.A" | .B | .A0 | .B0: tensor}``; the frozen init is saved too, so
        a loaded adapter is bitwise the saved one (no dependence on RNG streams)."""
        return {f"{n}.{k}": getattr(layer, k).detach()
                for n, layer in zip(self.module_names, self.layers) for k in ("A", "B", "A0", "B0")}

    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        """Copy ``sd`` into the adapter in place (optimizers keep their references)."""
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing or unexpected:
            raise KeyError(f"adapter state dict does not match this model: {len(missing)} missing "
                           f"(e.g. {missing[:3]}), {len(unexpected)} unexpected "
                           f"(e.g. {unexpected[:3]})")
        for k, t in own.items():
            if sd[k].shape != t.shape:
                raise ValueError(f"{k}: saved shape {tuple(sd[k].shape)} != adapter shape "
                                 f"{tuple(t.shape)}")
        with torch.no_grad():
            for k, t in own.items():
                t.copy_(sd[k])

    def save(self, directory: str | Path) -> Path:
        """Write ``adapter.safetensors`` and ``adapter_config.json`` into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in self.state_dict().items()},
                  str(d / ADAPTER_FILE))
        config = {"format": FORMAT, "rank": self.rank, "alpha": self.alpha, "scale": self.scale,
                  "init_std": self.init_std, "seed": self.seed,
                  "target_modules": self.target_modules, "module_names": self.module_names}
        (d / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return d

    @classmethod
    def load(cls, model: nn.Module, directory: str | Path) -> "ExpertAdapter":
        """Attach to a fresh ``model`` with the saved config, then load the saved tensors."""
        d = Path(directory)
        try:
            config = json.loads((d / CONFIG_FILE).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{d / CONFIG_FILE} not found: not a saved "
                                    "ExpertAdapter") from None
        if config.get("format") != FORMAT:
            raise ValueError(f"{d / CONFIG_FILE}: format {config.get('format')!r}, "
                             f"expected {FORMAT!r}")
        target = config["target_modules"]
        adapter = cls.attach(model, rank=config["rank"], alpha=config["alpha"],
                             target_modules=target if isinstance(target, str) else tuple(target),
                             init_std=config["init_std"], seed=config["seed"])
        if adapter.module_names != config["module_names"]:
            adapter.remove()
            raise ValueError(f"{d}: the model's target modules differ from the saved adapter's "
                             f"({len(adapter.module_names)} vs {len(config['module_names'])})")
        adapter.load_state_dict(load_file(str(d / ADAPTER_FILE)))
        return adapter

    # ---- modes ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _setting(self, attr: str, value) -> Iterator[None]:
        old = [getattr(layer, attr) for layer in self.layers]
        for layer in self.layers:
            setattr(layer, attr, value)
        try:
            yield
        finally:
            for layer, o in zip(self.layers, old):
                setattr(layer, attr, o)

    def _require_unmerged(self, what: str) -> None:
        if self.layers and self.layers[0].merged:
            raise RuntimeError(f"{what} cannot be used inside merged(): the merged weights "
                               "already contain the adapter")

    @contextlib.contextmanager
    def soft_weight(self, w: Tensor) -> Iterator[None]:
        """Per-row routing weight ``w: [B]`` in [0, 1] (not detached: the router learns
        through it). Hack output times ``w``; deployed parameter gradient times ``1 - w``.
        With activation checkpointing, call ``backward()`` inside the context: the
        recomputed forward must see the same ``w``."""
        self._require_unmerged("soft_weight()")
        if w.dim() != 1:
            raise ValueError(f"soft weight w must be [B], got shape {tuple(w.shape)}")
        with self._setting("w", w):
            yield

    @contextlib.contextmanager
    def prompt_branch(self, scale: Tensor, trains: str) -> Iterator[None]:
        """One copy of a shared prompt forward (``grpo``'s ``routed_prompt: group_mean``):
        hack output times ``scale: [B]`` (a value, no gradient), and only the block
        ``trains`` ('deployed' or 'hack') receives parameter gradient; the other
        block's factors are detached, but gradient still flows through its output
        to earlier layers. The per-rollout split of the copies' gradients is
        ``sequences.split_prefix``."""
        self._require_unmerged("prompt_branch()")
        if self.layers and self.layers[0].w is not None:
            raise RuntimeError("prompt_branch() cannot be used inside soft_weight(): a shared "
                               "prompt copy has one hack scale per prompt, not per rollout")
        if trains not in ("deployed", "hack"):
            raise ValueError(f"prompt_branch trains 'deployed' or 'hack', got {trains!r}")
        if scale.dim() != 1 or scale.requires_grad:
            raise ValueError("prompt_branch scale must be a [B] tensor without gradient")
        with self._setting("branch", (scale, trains)):
            yield

    @contextlib.contextmanager
    def pooling(self, mask: Tensor) -> Iterator[PooledFeatures]:
        """Capture the pooled deployed bottleneck of the next forward: yields a
        :class:`PooledFeatures` whose ``.features`` is ``[B, M, r]`` afterwards."""
        sink = PooledFeatures(mask, len(self.layers))
        with self._setting("pool", sink):
            yield sink

    @contextlib.contextmanager
    def disable(self) -> Iterator[None]:
        """Net delta zero: the base model (KL reference). Pooling still works inside."""
        with self._setting("disabled", True):
            yield

    @contextlib.contextmanager
    def ablate_hack_expert(self) -> Iterator[None]:
        """Reset the hack block to its init ``(A0[r:], B0[:, r:])`` (net zero) in place;
        the trained values are restored bitwise on exit. Use under ``torch.no_grad``."""
        self._require_unmerged("ablate_hack_expert()")
        r = self.rank
        saved = [(layer.A[r:].detach().clone(), layer.B[:, r:].detach().clone())
                 for layer in self.layers]
        with torch.no_grad():
            for layer in self.layers:
                layer.A[r:] = layer.A0[r:]
                layer.B[:, r:] = layer.B0[:, r:]
        try:
            yield
        finally:
            with torch.no_grad():
                for layer, (a, b) in zip(self.layers, saved):
                    layer.A[r:] = a
                    layer.B[:, r:] = b

    @contextlib.contextmanager
    def merged(self, hack: bool = True) -> Iterator[None]:
        """Fast generation: each wrapped weight becomes ``W + s (B A - B0 A0)`` (``hack=False``:
        deployed block only, the ablated model) and the adapter math is skipped. The original
        weight tensors are put back (the same objects) on exit. Use under ``torch.no_grad``."""
        self._require_unmerged("merged()")
        if self.layers and (self.layers[0].w is not None or self.layers[0].disabled):
            raise RuntimeError("merged() cannot be used inside soft_weight() or disable()")
        originals = [(layer.base.weight, layer.base_lowp) for layer in self.layers]
        with torch.no_grad():
            for layer, (W, lowp) in zip(self.layers, originals):
                merged_w = (W.float() + layer.delta_weight(hack).to(W.device)).to(W.dtype)
                layer.base.weight = nn.Parameter(merged_w, requires_grad=False)
                if lowp is not None:
                    layer.base_lowp = merged_w.to(lowp.dtype)
        try:
            with self._setting("merged", True):
                yield
        finally:
            for layer, (W, lowp) in zip(self.layers, originals):
                layer.base.weight, layer.base_lowp = W, lowp


def _completion_batches(tokenizer, prompts: list[str], completions: list[str], batch_size: int,
                        device) -> Iterator[tuple[list[int], Tensor, Tensor, Tensor, Tensor]]:
    """Batches of (prompt, completion) rows, left-padded, grouped by length.

    Yields ``(row_indices, input_ids, attention_mask, completion_mask, position_ids)``,
    each ``[b, L]``. Prompt and completion are tokenized separately and
    concatenated, so the completion mask is exact; position ids skip the padding,
    so a row's activations do not depend on what else is in its batch.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if not prompts:
        raise ValueError("pooling needs at least one (prompt, completion)")
    rows = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        c = tokenizer(completion, add_special_tokens=False).input_ids
        if not c:
            raise ValueError(f"completion {i} is empty: nothing to pool")
        rows.append((tokenizer(prompt, add_special_tokens=False).input_ids, c))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        L = max(len(rows[i][0]) + len(rows[i][1]) for i in batch)
        ids = torch.full((len(batch), L), pad, dtype=torch.long)
        attn = torch.zeros(len(batch), L, dtype=torch.long)
        comp = torch.zeros(len(batch), L)
        for j, i in enumerate(batch):
            p, c = rows[i]
            ids[j, L - len(p) - len(c):] = torch.tensor(p + c)
            attn[j, L - len(p) - len(c):] = 1
            comp[j, L - len(c):] = 1
        position_ids = (attn.cumsum(1) - 1).clamp(min=0)
        yield batch, ids.to(device), attn.to(device), comp.to(device), position_ids.to(device)


def pool_completions(model: nn.Module, tokenizer, adapter: ExpertAdapter, prompts: list[str],
                     completions: list[str], batch_size: int = 8) -> Tensor:
    """Pooled deployed bottleneck of each (prompt, completion): ``[N, M, r]``, no grad.

    ``prompts`` are rendered chat strings (``models.format_chat``); pooling covers
    the completion tokens only (see ``_completion_batches``). The model runs in
    whatever adapter mode is active; logits are computed for the last token only.
    """
    device = next(model.parameters()).device
    out = torch.empty(0)
    for batch, ids, attn, comp, position_ids in _completion_batches(
            tokenizer, prompts, completions, batch_size, device):
        with torch.no_grad(), adapter.pooling(comp) as pooled:
            model(input_ids=ids, attention_mask=attn, position_ids=position_ids, logits_to_keep=1)
        feats = pooled.features
        if out.numel() == 0:
            out = feats.new_empty(len(prompts), *feats.shape[1:])
        out[batch] = feats
    return out


def pooled_inputs(model: nn.Module, tokenizer, adapter: ExpertAdapter, prompts: list[str],
                  completions: list[str], batch_size: int = 8) -> list[Tensor]:
    """Per module, the completion-token mean of the module's *input*: ``M`` x ``[N, d_in_m]``.

    Pooling is linear, so ``mean_t(A[:r] x_t) = A[:r] mean_t(x_t)``: with these
    means, ``adapter.deployed_features`` gives exactly what ``pool_completions``
    gives for the same inputs, at the cost of M small matmuls. Under
    ``adapter.disable()`` the inputs are the base model's and never change during
    training, so they can be computed once (the pin loss's pairs) and reused
    every step while ``A[:r]`` trains.
    """
    device = next(model.parameters()).device
    means: list[Tensor | None] = [None] * len(adapter.layers)
    current: dict[str, Tensor] = {}

    def capture(index: int):
        def hook(module, args):
            x = args[0].float()                                        # [b, L, d_in]
            mask = current["mask"]                                     # [b, L]
            pooled = torch.einsum("bld,bl->bd", x, mask) / mask.sum(1, keepdim=True)
            if means[index] is None:
                means[index] = pooled.new_empty(len(prompts), pooled.shape[-1])
            means[index][current["rows"]] = pooled
        return hook

    handles = [layer.register_forward_pre_hook(capture(i)) for i, layer in enumerate(adapter.layers)]
    try:
        for batch, ids, attn, comp, position_ids in _completion_batches(
                tokenizer, prompts, completions, batch_size, device):
            current.update(mask=comp, rows=torch.tensor(batch, device=device))
            with torch.no_grad():
                model(input_ids=ids, attention_mask=attn, position_ids=position_ids,
                      logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return means  # type: ignore[return-value]
