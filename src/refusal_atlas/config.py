"""Config checks that a JSON schema cannot express: cross-references between sections.

``workflow/schemas/config.schema.yaml`` checks types, ranges and enums (and fills defaults)
first; this names the offending key when a section refers to something that does not exist.
"""

from __future__ import annotations

from collections.abc import Mapping

REFUSAL_DIRECTION_SPLIT_FILES: dict[str, str] = {
    f"{label}_{split}": f"splits/{label}_{split}.json"
    for label in ("harmful", "harmless")
    for split in ("train", "val", "test")
}


class ConfigError(ValueError):
    """An invalid config; the message names the offending key."""


def check_config(config: Mapping) -> None:
    promptsets = set(config["promptsets"])
    refs = {
        "organism.train_promptsets": config["organism"]["train_promptsets"],
        "organism.eval_promptsets": config["organism"]["eval_promptsets"],
        "activations.promptsets": config["activations"]["promptsets"],
        "evaluation.promptsets": config["evaluation"]["promptsets"],
        "direction.promptset": [config["direction"]["promptset"]],
        "features.promptsets": config["features"]["promptsets"],
    }
    for key, names in refs.items():
        unknown = [n for n in names if n not in promptsets]
        if unknown:
            raise ConfigError(f"{key}: unknown promptset(s) {unknown}; defined: {sorted(promptsets)}")
    if config["direction"]["promptset"] not in config["activations"]["promptsets"]:
        raise ConfigError(
            f"direction.promptset {config['direction']['promptset']!r} must also be listed in activations.promptsets"
        )
    for name, spec in config["promptsets"].items():
        fr = spec.get("split_fractions")
        if spec["source"] == "bundled" and fr and abs(sum(fr.values()) - 1) > 1e-6:
            raise ConfigError(f"promptsets.{name}.split_fractions must sum to 1, got {sum(fr.values())}")
    feats = config["features"]
    if "heldout" in feats["protocols"] and feats["fit_split"] == feats["eval_split"]:
        raise ConfigError(
            f"features.fit_split and features.eval_split are both {feats['fit_split']!r}: the heldout "
            "protocol needs different splits (the transductive protocol already fits on the eval split)"
        )
    for name, spec in config["models"].items():
        sae = spec["sae"]
        if sae["source"] == "train" and sae["k"] > sae["d_sae"]:
            raise ConfigError(f"models.{name}.sae.k ({sae['k']}) exceeds models.{name}.sae.d_sae ({sae['d_sae']})")
