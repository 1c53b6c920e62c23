"""Steering conditions (Yeo et al. 2025, §4.1; Arditi et al. 2024, §3-4): what each name means.

A condition is named by the ``{method}`` wildcard, so each file says what made it:

- ``base``: no intervention;
- ``as``: directional ablation of r̂ at every layer and position (Arditi et al. 2024, Eq. 4);
- ``add``: ``+ coeff · r`` into the residual stream at l* (Arditi et al. 2024, Eq. 5; "AS-add");
- ``{selector}-{scope}-{protocol}[-k{K}][-x{c}|-s{v}]``: clamp a selected feature set, where
  ``selector`` is ``cossim``, ``actdiff``, ``ap``, ``la_ig`` or ``random`` (features of the same
  per-layer sizes as ``la_ig``'s set, drawn from the other live latents), ``scope`` is ``global``
  or ``local`` (per prompt), ``protocol`` is ``transductive`` or ``heldout``, ``k`` overrides K*,
  ``x`` multiplies by c and ``s`` sets to v times the feature's mean max activation on harmful
  prompts. Without ``x``/``s`` the clamp multiplies by c (its fallbacks: ``config.resolve``). Numbers are written with
  ``m`` for minus and ``p`` for the point: ``x-3`` is ``xm3``, ``s0.5`` is ``s0p5``.

Pure parsing, no torch: the Snakefile reads these names when it builds the DAG.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SELECTORS: tuple[str, ...] = ("cossim", "actdiff", "ap", "la_ig", "random")
SCOPES: tuple[str, ...] = ("global", "local")
PROTOCOLS: tuple[str, ...] = ("transductive", "heldout")
_NUMBER = r"m?\d+(?:p\d+)?"
_CLAMP = re.compile(
    rf"^(?P<selector>{'|'.join(SELECTORS)})-(?P<scope>{'|'.join(SCOPES)})-(?P<protocol>{'|'.join(PROTOCOLS)})"
    rf"(?:-k(?P<k>\d+))?(?:-(?P<mode>[xs])(?P<value>{_NUMBER}))?$"
)


def format_number(x: float) -> str:
    """``-3 -> m3``, ``0.5 -> 0p5``: a number as it appears in a condition name."""
    text = f"{x:g}"
    if "e" in text:
        raise ValueError(f"{x} cannot be written in a condition name; use a plain decimal")
    return text.replace("-", "m").replace(".", "p")


def parse_number(text: str) -> float:
    return float(text.replace("m", "-").replace("p", "."))


@dataclass(frozen=True)
class Condition:
    """A parsed ``{method}`` wildcard."""

    name: str
    kind: str  # base | ablate | add | clamp
    selector: str | None = None
    scope: str | None = None
    protocol: str | None = None
    k_star: int | None = None  # None: the tuned (or configured) K*
    mode: str | None = None  # multiply | set
    value: float | None = None  # None with multiply: the tuned (or configured) c

    @property
    def labels(self) -> tuple[str, ...]:
        """The prompts a condition is generated on: bypass on harmful, induction on harmless."""
        if self.kind == "base":
            return ("harmful", "harmless")
        if self.kind == "add" or self.mode == "set":
            return ("harmless",)
        return ("harmful",)


def parse_condition(name: str) -> Condition:
    """Parse a condition name; an unknown one is a clear error that lists the grammar."""
    if name in ("base", "as", "add"):
        return Condition(name, {"base": "base", "as": "ablate", "add": "add"}[name])
    m = _CLAMP.match(name)
    if m is None:
        raise ValueError(
            f"unknown steering condition {name!r}: use base, as, add or "
            f"{{{'|'.join(SELECTORS)}}}-{{global|local}}-{{transductive|heldout}}[-k<K>][-x<c>|-s<v>] "
            "(numbers with m for minus and p for the point, e.g. la_ig-global-heldout-xm3)"
        )
    mode = {"x": "multiply", "s": "set", None: "multiply"}[m["mode"]]
    value = parse_number(m["value"]) if m["value"] is not None else None
    return Condition(name, "clamp", m["selector"], m["scope"], m["protocol"],
                     int(m["k"]) if m["k"] else None, mode, value)


def clamp_name(selector: str, scope: str, protocol: str, k_star: int | None = None, mode: str | None = None,
               value: float | None = None) -> str:
    name = f"{selector}-{scope}-{protocol}"
    if k_star is not None:
        name += f"-k{k_star}"
    if mode is not None:
        name += f"-{'x' if mode == 'multiply' else 's'}{format_number(value)}"
    parse_condition(name)
    return name
