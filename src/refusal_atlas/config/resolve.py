"""The one place where the config's nulls get their values, once per model.

A null means "take it from elsewhere". The fallbacks, every one of them here:

- **c and K* of a clamp** (:func:`steering_clamp`, :attr:`Resolved.dashboards`,
  :attr:`Resolved.categories`): the condition's own (``-k20``, ``-x-3``), else the section's,
  else ``steering``'s; what is still null is *searched*: ``steering_search`` chooses it
  (Yeo et al. 2025, §3.3) and the stage reads it from ``hparams.json`` with :meth:`Clamp.require`.
  Only a clamp with a searched value gets ``hparams.json`` as an input, so a search rerun
  reruns nothing that does not use it.
- **K* of probes, guardrails and categories**: ``features.k_star`` (the size every selector fits).
- **A feature set's protocol** (probes, guardrails, dashboards): held out wherever it was fitted,
  else the first of ``features.protocols``.
- **l\\*** (``direction.layer``): chosen by ``refusal_direction`` on validation prompts and read
  from ``results/directions/<model>.json`` (``pipeline.openers.read_direction``); it is a
  measured choice, not a config default, so it is not resolved here.

``workflow/rules/common.smk`` builds rule inputs and params from :func:`resolve`; the stages
receive those params and only fill in what the search chose. A test builds the DAG of every
shipped config and checks that the two agree (``tests/config/test_resolve.py``).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from refusal_atlas.steering.conditions import Condition



# The features keys that choose LA-IG's mode; the category study takes them as they are, while
# its steps and batch have their own fallbacks (LAIGConfig.from_section reads them all).
LA_IG_MODE_KEYS = ("la_ig_path", "la_ig_positions", "la_ig_patch_error")

@dataclass(frozen=True)
class Clamp:
    """K* and c of a feature clamp as the config fixes them; a None is chosen by the search.

    ``uses_c`` is false for a clamp that sets its features to a value (``-s<v>``), which has no c.
    """

    k_star: int | None
    c: float | None
    uses_c: bool = True

    @property
    def searched(self) -> tuple[str, ...]:
        """The keys ``steering_search``'s ``hparams.json`` must supply."""
        return tuple(k for k, v in (("k_star", self.k_star), ("c", self.c if self.uses_c else 0)) if v is None)

    def fill(self, chosen: Mapping | None) -> Clamp:
        """The searched keys taken from the search's choice (``hparams.json["chosen"]``)."""
        chosen = chosen or {}
        return Clamp(self.k_star if self.k_star is not None else chosen.get("k_star"),
                     self.c if self.c is not None or not self.uses_c else chosen.get("c"), self.uses_c)

    def require(self, chosen: Mapping | None, what: str) -> tuple[int, float | None]:
        """K* and c, or a clear error naming ``what`` when the config and the search leave one open."""
        done = self.fill(chosen)
        if done.searched:
            raise ValueError(f"{what}: {' and '.join(done.searched)} are null in the config and no "
                             "steering_search result was given (steering.search, hparams.json)")
        return int(done.k_star), done.c


def read_search(path: str | Path | None) -> dict | None:
    """The hyperparameters ``steering_search`` chose, or None without a search."""
    return json.loads(Path(path).read_text())["chosen"] if path else None


def steering_clamp(cond: Condition, steering: Mapping) -> Clamp | None:
    """A condition's clamp: its own K*/c, else ``steering``'s; None for a condition that is no clamp."""
    if cond.kind != "clamp":
        return None
    multiply = cond.mode == "multiply"
    c = (cond.value if cond.value is not None else steering["c"]) if multiply else None
    return Clamp(cond.k_star or steering["k_star"], c, multiply)


def feature_protocol(config: Mapping, configured: str | None) -> str:
    """A feature set's protocol: as configured, else held out wherever it was fitted."""
    protocols = config["features"]["protocols"]
    return configured or ("heldout" if "heldout" in protocols else protocols[0])


def probe_protocol(config: Mapping) -> str:
    return feature_protocol(config, config["probes"]["protocol"])


def dashboard_protocol(config: Mapping) -> str:
    return feature_protocol(config, config["dashboards"]["reference"]["protocol"])


def _without(cfg: Mapping, *keys: str) -> dict:
    return {k: v for k, v in cfg.items() if k not in keys}


@dataclass(frozen=True)
class Resolved:
    """One model's sections with their nulls resolved; build it with :func:`resolve`."""

    steering: Mapping
    probes: Mapping
    dashboards: Mapping
    categories: Mapping
    guardrail_refusal: Mapping
    features: Mapping

    def clamp(self, cond: Condition) -> Clamp | None:
        return steering_clamp(cond, self.steering)

    @property
    def dashboard_clamp(self) -> Clamp:
        return Clamp(**self.dashboards["clamp"])

    @property
    def category_clamp(self) -> Clamp:
        return Clamp(**self.categories["clamp"])

    def refusal_guardrail(self, weights: str) -> dict:
        """The refusal guardrail's keys for the ``base`` (untuned) or ``tuned`` weights: only the
        untuned ones fit a direction of their own, added with ``add_coeff`` unless set."""
        cfg = {**self.guardrail_refusal}
        own = {**cfg.pop("own_direction")}
        if weights == "base" and own["promptsets"]:
            own["coeff"] = cfg["add_coeff"] if own["coeff"] is None else own["coeff"]
            cfg["own_direction"] = own
        return cfg


def resolve(config: Mapping) -> Resolved:
    """Resolve every null of one model's config (its overrides merged in: ``sections.for_model``)."""
    feats, steer = config["features"], config["steering"]
    probes = {**config["probes"], "k_star": config["probes"]["k_star"] or feats["k_star"],
              "protocol": probe_protocol(config)}
    db = config["dashboards"]
    dashboards = {**_without(db, "enabled", "c", "k_star"), "methods": db["methods"] or feats["methods"],
                  "reference": {**db["reference"], "protocol": dashboard_protocol(config)},
                  "clamp": asdict(Clamp(db["k_star"] or steer["k_star"], steer["c"] if db["c"] is None else db["c"]))}
    cat = config["categories"]
    k_cat = cat["k_star"] or feats["k_star"]
    categories = {**_without(cat, "enabled", "promptset", "c"), "k_star": k_cat, "k0": feats["k0"],
                  "ig_steps": cat["ig_steps"] or feats["ig_steps"], "la_bz": cat["la_bz"] or feats["la_bz"],
                  **{k: feats[k] for k in LA_IG_MODE_KEYS},
                  "clamp": asdict(Clamp(k_cat, steer["c"] if cat["c"] is None else cat["c"]))}
    gr = config["guardrails"]["refusal"]
    guardrail = {**_without(gr, "weights"), "k_star": gr["k_star"] or feats["k_star"],
                 "protocol": gr["protocol"] or probes["protocol"],
                 "add_coeff": steer["add_coeff"] if gr["add_coeff"] is None else gr["add_coeff"]}
    return Resolved(steer, probes, dashboards, categories, guardrail, feats)
