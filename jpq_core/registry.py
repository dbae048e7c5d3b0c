"""Every pruning criterion by name, weight level and channel level, in one place."""

from __future__ import annotations

from jpq_core.channels import BNScale, GroupFisher, GroupL1, GroupL2, GroupTaylor
from jpq_core.criteria import SNIP, Fisher, GradientMagnitude, Magnitude, Random, Taylor
from jpq_core.criterion import Criterion
from jpq_core.errors import JPQError

WEIGHT_CRITERIA = {
    "magnitude": Magnitude,
    "taylor": lambda: Taylor("abs"),
    "taylor-abs": lambda: Taylor("abs"),
    "taylor-square": lambda: Taylor("square"),
    "taylor-abs-norm": lambda: Taylor("abs", normalise=True),
    "taylor-square-norm": lambda: Taylor("square", normalise=True),
    "fisher": Fisher,
    "snip": SNIP,
    "gradient": GradientMagnitude,
    "random": Random,
}
CHANNEL_CRITERIA = {"group-l1": GroupL1, "group-l2": GroupL2, "bn-scale": BNScale,
                    "group-taylor": GroupTaylor, "group-fisher": GroupFisher}
ALIASES = {"taylor-abs": "taylor"}  # names kept for configurations saved with them


def get_criterion(name: str) -> Criterion:
    """A new criterion object by name (weight or channel level)."""
    if name in WEIGHT_CRITERIA:
        return WEIGHT_CRITERIA[name]()
    if name in CHANNEL_CRITERIA:
        return CHANNEL_CRITERIA[name]()
    raise JPQError(f"unknown criterion {name!r}; weight level: {', '.join(WEIGHT_CRITERIA)}; "
                   f"channel level: {', '.join(CHANNEL_CRITERIA)}.")


def criterion_names(level: str | None = None) -> list[str]:
    """The criteria to offer a user, aliases left out: of one level ("weight", "channel") or all."""
    if level not in (None, "weight", "channel"):
        raise JPQError(f"criterion level must be weight or channel, not {level!r}.")
    names = {"weight": list(WEIGHT_CRITERIA), "channel": list(CHANNEL_CRITERIA)}
    chosen = names[level] if level else names["weight"] + names["channel"]
    return [n for n in chosen if n not in ALIASES]
