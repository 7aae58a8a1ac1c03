"""The training arms, defined once: every module, notebook and figure reads them here.

An arm is one way of deciding, per rollout, how much of its learning goes into
the hack expert (``w``, DESIGN.md section 4):

- ``oracle``: ``w`` is the grader's strict hack label of the rollout (1 on
  "Reward hack", 0 otherwise): label-based gradient routing (Cloud et al.;
  jnward/gradient-routing-rl on this environment). It reads training labels
  **on purpose**: it is the ceiling that says how much of the hacking this
  adapter, model and budget can localize when the routing is perfect;
- ``evil_moe``: a learned router that starts from ``v_act``, anchored by the
  pin loss on the authored pairs;
- ``haar``: the same router started from a Haar-random direction (pin on);
- ``no_pin``: the router from ``v_act`` without the pin loss;
- ``vanilla``: no routing at all, both blocks learn from every rollout; its
  block ``[r:]`` is the matched-capacity control.

``DISPLAY_ORDER`` is the order figures and tables show them: the oracle
ceiling first, the control last.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arm:
    name: str
    routed: bool
    """Has a learned router (``HackRouter``): trained, checkpointed, diagnosed at evaluation."""
    pinned: bool
    """The pin loss on the authored pairs is on (needs ``routed``)."""
    start: str | None
    """Where the router's gate starts: ``'v_act'``, ``'haar'``, or None (no router)."""
    uses_labels: bool
    """Reads the grader's labels of training rollouts (only the oracle, as a ceiling)."""
    description: str
    color: str
    """Its colour in every figure."""

    @property
    def routes(self) -> bool:
        """The two blocks learn from different rollouts (a router or labels set ``w``),
        so removing either block is a question about localization."""
        return self.routed or self.uses_labels

    def __post_init__(self) -> None:
        if self.pinned and not self.routed:
            raise ValueError(f"arm {self.name!r}: the pin loss needs a router")
        if (self.start is not None) != self.routed:
            raise ValueError(f"arm {self.name!r}: a start direction exactly when routed")
        if self.start not in (None, "v_act", "haar"):
            raise ValueError(f"arm {self.name!r}: unknown start direction {self.start!r}")
        if self.uses_labels and self.routed:
            raise ValueError(f"arm {self.name!r}: a label-routed arm has no learned router")


ARM_LIST: tuple[Arm, ...] = (
    Arm("evil_moe", routed=True, pinned=True, start="v_act", uses_labels=False,
        description="router from v_act + pin loss", color="#c0392b"),
    Arm("vanilla", routed=False, pinned=False, start=None, uses_labels=False,
        description="no routing: both blocks train on every rollout; block [r:] is the "
                    "matched control", color="#34495e"),
    Arm("haar", routed=True, pinned=True, start="haar", uses_labels=False,
        description="router from a Haar-random direction + pin loss", color="#8e44ad"),
    Arm("no_pin", routed=True, pinned=False, start="v_act", uses_labels=False,
        description="router from v_act, no pin loss", color="#d68910"),
    Arm("oracle", routed=False, pinned=False, start=None, uses_labels=True,
        description="w = the grader's hack label of each training rollout, label-based "
                    "gradient routing: uses training labels on purpose, as a ceiling",
        color="#1e8449"),
)
BY_NAME: dict[str, Arm] = {a.name: a for a in ARM_LIST}
ARMS: tuple[str, ...] = tuple(BY_NAME)
"""Every arm, in the order they were added (config choices and error messages)."""
DISPLAY_ORDER: tuple[str, ...] = ("oracle", "evil_moe", "haar", "no_pin", "vanilla")
"""The order of figures and tables: the label-routed ceiling first, the control last."""
ROUTED_ARMS: tuple[str, ...] = tuple(a.name for a in ARM_LIST if a.routed)
PINNED_ARMS: tuple[str, ...] = tuple(a.name for a in ARM_LIST if a.pinned)
LABEL_ARMS: tuple[str, ...] = tuple(a.name for a in ARM_LIST if a.uses_labels)
CONTROL = "vanilla"
"""The arm every other arm's ON-OFF drop is contrasted with."""


def get(name: str) -> Arm:
    """The arm called ``name``; an unknown name is one clear error."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown arm {name!r}; known arms: {', '.join(ARMS)}") from None


def ordered(names) -> list[str]:
    """``names`` in ``DISPLAY_ORDER`` (oracle first, control last); unknown names last."""
    names = set(names)
    return [a for a in DISPLAY_ORDER if a in names] + sorted(names - set(DISPLAY_ORDER))


def help_text() -> str:
    """One clause per arm, for the config's help text."""
    return "; ".join(f"{a.name} ({a.description})" for a in ARM_LIST) + "."


if set(DISPLAY_ORDER) != set(ARMS):
    raise AssertionError("DISPLAY_ORDER must name every arm once")
