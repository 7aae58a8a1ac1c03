"""HackRouter: one routing weight per rollout from its pooled deployed activations.

Input: the pooled deployed bottleneck ``h: [B, M, r]`` of each rollout (from
``ExpertAdapter.pooling``, computed under ``torch.no_grad`` by the caller).
Output: ``w = sigmoid(scale * <gate, h> + bias)`` in [0, 1], one per rollout,
where ``<gate, h> = sum_m <gate[m], h[m]>`` is ``vact.projections``. The gate
starts as a given direction (``v_act`` or a Haar-random control); gate, scale
and bias are all learned. There is no load-balancing term: the two experts are
meant to specialise asymmetrically.

The pin loss anchors the router to the authored pairs: binary cross-entropy
pushing ``w`` to 1 on the hack side and to 0 on the clean side.

Two label-free options change what the router reads and how its logits are
scaled (``RunConfig.router_centering`` and ``router_calibration``):

- **group centring** (``center_groups``): ``h_i - mean_{j in g(i)} h_j`` over
  the rollouts of one prompt (a GRPO group of G in training, the K samples of
  a problem at evaluation). Rollouts of one prompt share the prompt's share of
  the features; what is left is how they behave. An authored pair is a group
  of two (``center_pairs``): its sides become ``+-(h+ - h-)/2``.
- **batch calibration** (``calibration="batch"``): the projection
  ``p = <gate, h>`` is standardised, ``(p - mu) / sd``, before scale and bias.
  In training (``router.train()``) ``mu, sd`` are the statistics of the step's
  rollouts, set by ``observe``; a running mean/std of them (momentum ``m``:
  ``run <- (1 - m) run + m batch``, the first batch sets them) is kept in the
  router's state and used in ``router.eval()``. ``observe`` reads features
  only, never a grader label.

Two fixed numbers set where a rollout's ``w`` sits (``router_prior``,
``router_sharpness``); neither touches the pin loss, which keeps reading
``logits``. A rollout's weight is

    w = sigmoid(sharpness * (scale * z + bias) + log(prior / (1 - prior)))

- the **prior** is Bayes' rule under a shift of the class prior: the pairs are
  balanced (one hack per clean side, prior 1/2), so their calibrated logit is a
  likelihood ratio; a population where a share ``prior`` hacks adds
  ``log(prior / (1 - prior))``. With group centring most rollouts of a group
  sit near the group mean, ``z ~ 0``, where ``prior = 1/2`` puts ``w ~ 0.5``;
- the **sharpness** multiplies the calibrated logit: the pairs' hack-vs-clean
  difference sets the scale, and the rollouts of a group differ less than that,
  so their logits are flat.
``prior = 0.5, sharpness = 1`` is the router without either. Both are chosen on
training problems (``scripts/router_options.py``), never from a grader label at
run time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import NEUTRAL_LEVELS
from .vact import projections


CENTERINGS = ("none", "group")
CALIBRATIONS = ("pairs", "batch")
STD_EPS = 1e-6
"""Added to the batch variance before the square root (as in batch norm), so a batch of
identical rollouts gives logits 0 rather than a division by zero."""


def center_groups(features: Tensor, group_size: int) -> Tensor:
    """``features: [B, M, r]``, rows group-major (``B = P * G``, the G rollouts of a prompt
    adjacent) -> ``h_i - mean_{j in group(i)} h_j``, same shape. Adding any constant
    ``c_g: [M, r]`` to every row of a group leaves the result unchanged."""
    B = features.shape[0]
    if group_size < 1 or B % group_size:
        raise ValueError(f"{B} rollouts do not split into groups of {group_size}")
    g = features.reshape(B // group_size, group_size, *features.shape[1:])
    return (g - g.mean(dim=1, keepdim=True)).reshape(features.shape)


def center_pairs(hack: Tensor, clean: Tensor) -> tuple[Tensor, Tensor]:
    """An authored pair is a group of two (one prompt, two completions):
    ``hack, clean: [N, M, r]`` -> ``(hack - mid, clean - mid)`` with ``mid = (hack + clean) / 2``,
    i.e. ``+-(hack - clean) / 2``."""
    mid = (hack + clean) / 2
    return hack - mid, clean - mid


class HackRouter(nn.Module):
    """``w = sigmoid(scale * z + bias)`` with ``z = sum_m <gate[m], h[m]>`` (``calibration``
    'pairs') or ``z`` standardised with batch / running statistics ('batch'); the gate
    starts as ``direction: [M, r]``."""

    def __init__(self, direction: Tensor, calibration: str = "pairs", momentum: float = 0.1,
                 prior: float = NEUTRAL_LEVELS[0],
                 sharpness: float = NEUTRAL_LEVELS[1]):
        super().__init__()
        if direction.dim() != 2:
            raise ValueError(f"direction must be [M, r], got shape {tuple(direction.shape)}")
        if calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        if not 0 < prior < 1:
            raise ValueError(f"prior must be in (0, 1), got {prior}")
        if not sharpness > 0:
            raise ValueError(f"sharpness must be positive, got {sharpness}")
        self.calibration, self.momentum = calibration, momentum
        # fixed numbers from the config, not parameters: the saved state is unchanged
        self.prior_logit, self.sharpness = math.log(prior / (1 - prior)), float(sharpness)
        self.gate = nn.Parameter(direction.detach().float().clone())  # [M, r]
        self.scale = nn.Parameter(torch.ones((), device=direction.device))
        self.bias = nn.Parameter(torch.zeros((), device=direction.device))
        self._batch: tuple[Tensor, Tensor] | None = None   # this step's (mean, std), detached
        if calibration == "batch":       # saved with the router; 'pairs' keeps its old state
            self.register_buffer("running_mean", torch.zeros((), device=direction.device))
            self.register_buffer("running_std", torch.ones((), device=direction.device))
            self.register_buffer("num_batches", torch.zeros((), dtype=torch.long,
                                                            device=direction.device))

    def standardised(self, features: Tensor) -> Tensor:
        """``features: [B, M, r]`` -> ``z: [B]``: the projection on the gate, standardised
        under 'batch' calibration (this step's statistics in training, the running ones
        in eval mode; before any ``observe`` the running ones are 0 and 1)."""
        if features.shape[1:] != self.gate.shape:
            raise ValueError(f"router expects features [B, {self.gate.shape[0]}, "
                             f"{self.gate.shape[1]}], got {tuple(features.shape)}")
        p = projections(self.gate, features.float())
        if self.calibration == "pairs":
            return p
        mean, std = (self._batch if self.training and self._batch is not None
                     else (self.running_mean, self.running_std))
        return (p - mean) / std

    def logits(self, features: Tensor) -> Tensor:
        """``features: [B, M, r]`` -> ``[B]`` pre-sigmoid scores ``scale * z + bias``."""
        return self.scale * self.standardised(features) + self.bias

    @torch.no_grad()
    def observe(self, features: Tensor) -> None:
        """'batch' calibration: set this step's statistics from its rollouts' features
        ``[B, M, r]`` (all of the step's rollouts; no labels) and update the running ones:
        ``mu_b = mean(p)``, ``sd_b = sqrt(var(p) + eps)``; the first call sets
        ``run = b``, later ones ``run <- (1 - momentum) run + momentum b``."""
        if self.calibration != "batch":
            raise RuntimeError("observe() is for router_calibration='batch' only")
        p = projections(self.gate, features.float())
        mean, std = p.mean(), torch.sqrt(p.var(unbiased=False) + STD_EPS)
        self._batch = (mean, std)
        m = 1.0 if int(self.num_batches) == 0 else self.momentum
        self.running_mean.mul_(1 - m).add_(m * mean)
        self.running_std.mul_(1 - m).add_(m * std)
        self.num_batches += 1

    @classmethod
    def from_config(cls, direction: Tensor, cfg) -> "HackRouter":
        """The router a run's config asks for (``cfg``: a ``RunConfig``): its calibration,
        running-statistics momentum, prior and sharpness; the gate starts at ``direction``."""
        return cls(direction, cfg.router_calibration, cfg.router_stats_momentum,
                   prior=cfg.router_prior, sharpness=cfg.router_sharpness)

    def forward(self, features: Tensor) -> Tensor:
        """``features: [B, M, r]`` -> ``w: [B]`` in [0, 1], a rollout's routing weight:
        ``sigmoid(sharpness * logits + log(prior / (1 - prior)))``."""
        return torch.sigmoid(self.sharpness * self.logits(features) + self.prior_logit)

    @torch.no_grad()
    def calibrate(self, hack_feats: Tensor, clean_feats: Tensor) -> None:
        """Set scale and bias from the pairs' projections on the current gate.

        Rule ('pairs'): with ``p`` the projections of all 2N pair sides, ``mid`` the
        mean of the two class means and ``sd`` the std of all 2N projections,
        ``scale = sign(mean_hack - mean_clean) / sd`` and ``bias = -scale * mid``.
        Logits become z-scores centred between the classes, oriented so the hack
        side is positive: ``w = 0.5`` halfway between the class means. The sign
        uses only the pair labels, which are the labels training is allowed.
        Under 'batch' calibration the rollouts' statistics do the scaling, so the
        pairs only orient it: ``scale = sign(mean_hack - mean_clean)``, ``bias = 0``.
        """
        p_hack, p_clean = projections(self.gate, hack_feats.float()), projections(
            self.gate, clean_feats.float())
        sd = torch.cat([p_hack, p_clean]).std(unbiased=False)
        gap = p_hack.mean() - p_clean.mean()
        if not torch.isfinite(sd) or sd == 0 or gap == 0:
            raise ValueError("cannot calibrate: the pairs' projections on the gate are constant "
                             "or the two sides have the same mean")
        if self.calibration == "batch":
            self.scale.fill_(torch.sign(gap))
            self.bias.fill_(0.0)
            return
        self.scale.fill_(torch.sign(gap) / sd)
        self.bias.fill_(-self.scale * (p_hack.mean() + p_clean.mean()) / 2)


def pin_loss(router: HackRouter, hack_feats: Tensor, clean_feats: Tensor) -> Tensor:
    """BCE pushing ``w`` to 1 on the hack side and 0 on the clean side of the pairs.

    ``hack_feats, clean_feats: [N, M, r]`` -> scalar, the mean over all 2N sides.
    """
    logits = router.logits(torch.cat([hack_feats, clean_feats]))
    target = torch.cat([torch.ones(len(hack_feats)), torch.zeros(len(clean_feats))]).to(logits)
    return F.binary_cross_entropy_with_logits(logits, target)
