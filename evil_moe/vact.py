"""v_act: the activation-space hack direction, and its controls.

Per target module ``m``, ``v_act[m] = unit(mean over pairs(h_hack[m] - h_clean[m]))``
where ``h = A[:r] x`` is the deployed bottleneck pooled over completion tokens
(``adapter.pool_completions``). ``v_act`` is ``[M, r]`` with unit rows. The
control is a Haar-random direction of the same shape (each row uniform on the
unit sphere of R^r). ``loo_auroc`` asks whether the direction means anything:
the direction is re-extracted without one pair, that pair's two sides are
scored, and the AUROC of all held-out scores (hack = positive) is reported.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sklearn.metrics import roc_auc_score
from torch import Tensor

from .adapter import ExpertAdapter, pool_completions
from .models import format_chat
from .pairs import Pair

V_ACT_FILE = "v_act.safetensors"
"""The file in a run folder that holds the run's v_act (``save_v_act``)."""

DirectionFn = Callable[[Tensor, Tensor], Tensor]


def pair_features(model, tokenizer, adapter: ExpertAdapter, pairs: list[Pair],
                  batch_size: int = 8) -> tuple[Tensor, Tensor]:
    """Pooled deployed bottleneck of each pair side: ``hack, clean: [N, M, r]``.

    The prompt is rendered with the model's chat template as a single user turn;
    pooling covers the completion tokens only. Runs under no_grad in the
    adapter's current mode (the as-trained model unless a context says otherwise).
    """
    if not pairs:
        raise ValueError("pair_features needs at least one pair")
    prompts = [format_chat(tokenizer, [{"role": "user", "content": p.prompt}]) for p in pairs]
    hack = pool_completions(model, tokenizer, adapter, prompts, [p.hack for p in pairs], batch_size)
    clean = pool_completions(model, tokenizer, adapter, prompts, [p.clean for p in pairs],
                             batch_size)
    return hack, clean


def extract_v_act(hack_feats: Tensor, clean_feats: Tensor) -> Tensor:
    """``[N, M, r]`` x 2 -> ``v_act: [M, r]``, rows ``unit(mean_n(hack - clean))``."""
    if hack_feats.shape != clean_feats.shape or hack_feats.dim() != 3:
        raise ValueError(f"hack and clean features must both be [N, M, r], got "
                         f"{tuple(hack_feats.shape)} and {tuple(clean_feats.shape)}")
    diff = (hack_feats.float() - clean_feats.float()).mean(0)  # [M, r]
    norms = diff.norm(dim=-1, keepdim=True)
    bad = (~torch.isfinite(norms) | (norms == 0)).flatten().nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"mean hack-clean difference is zero or not finite for module(s) {bad}; "
                         "no direction can be extracted")
    return diff / norms


def haar_direction(num_modules: int, rank: int, seed: int) -> Tensor:
    """``[M, r]``: each row uniform on the unit sphere of R^r (a normalised Gaussian)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(num_modules, rank, generator=g)
    return v / v.norm(dim=-1, keepdim=True)


def projections(direction: Tensor, feats: Tensor) -> Tensor:
    """Scores ``[N]``: ``sum_m <direction[m], feats[n, m]>``.

    ``direction: [M, r]``, ``feats: [N, M, r]``.

    No normalisation: a plain sum over modules of per-module dot products, so a
    module weighs in proportion to its activation scale along its row. Scale-free
    uses (AUROC) do not care; the router learns its own scale and bias.
    """
    return torch.einsum("nmr,mr->n", feats, direction.to(feats))


def loo_projections(hack_feats: Tensor, clean_feats: Tensor,
                    direction_fn: DirectionFn | None = None) -> tuple[Tensor, Tensor]:
    """Leave-one-pair-out scores ``[N]`` for each side: pair ``i`` is scored with the
    direction that ``direction_fn`` (default ``extract_v_act``) builds from the others."""
    fn = direction_fn or extract_v_act
    n = len(hack_feats)
    if n < 2:
        raise ValueError(f"leave-one-out needs at least 2 pairs, got {n}")
    s_hack, s_clean = torch.empty(n), torch.empty(n)
    for i in range(n):
        keep = torch.arange(n) != i
        d = fn(hack_feats[keep], clean_feats[keep])
        s_hack[i] = projections(d, hack_feats[i:i + 1].float())[0]
        s_clean[i] = projections(d, clean_feats[i:i + 1].float())[0]
    return s_hack, s_clean


def loo_auroc(hack_feats: Tensor, clean_feats: Tensor,
              direction_fn: DirectionFn | None = None) -> float:
    """AUROC of held-out projections, hack side positive (0.5 = chance, 1 = perfect)."""
    s_hack, s_clean = loo_projections(hack_feats, clean_feats, direction_fn)
    labels = [1] * len(s_hack) + [0] * len(s_clean)
    return float(roc_auc_score(labels, torch.cat([s_hack, s_clean]).numpy()))


def save_v_act(path: str | Path, v_act: Tensor, meta: dict) -> None:
    """Write ``v_act: [M, r]`` to safetensors, ``meta`` (JSON-able) in the header."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({"v_act": v_act.detach().float().contiguous().cpu()}, str(path),
              metadata={"meta": json.dumps(meta)})


def load_v_act(path: str | Path) -> tuple[Tensor, dict]:
    """Read what ``save_v_act`` wrote: ``(v_act [M, r], meta)``."""
    with safe_open(str(path), framework="pt") as f:
        if "v_act" not in f.keys():
            raise KeyError(f"{path} holds no 'v_act' tensor (keys: {list(f.keys())})")
        header = f.metadata() or {}
        return f.get_tensor("v_act"), json.loads(header.get("meta", "{}"))
