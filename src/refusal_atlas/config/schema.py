"""The config's JSON-schema check, with short messages that name the key, and its canonical order.

"""

from __future__ import annotations

from collections.abc import Mapping


class ConfigError(ValueError):
    """An invalid config; the message names the offending key."""


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def schema_errors(config: Mapping, schema: Mapping) -> list[str]:
    """The schema's complaints about ``config``, one short line each, naming the key.

    Stricter than JSON Schema in one respect: ``integer`` means an int, not any number with no
    fraction (JSON Schema accepts ``8.0``, which then fails deep inside a stage as a TypeError).
    """
    import difflib

    import jsonschema

    base = jsonschema.validators.validator_for(schema)
    checker = base.TYPE_CHECKER.redefine(
        "integer", lambda _, x: isinstance(x, int) and not isinstance(x, bool))
    validator = jsonschema.validators.extend(base, type_checker=checker)(schema)
    lines = []
    for err in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
        where = _key(err.absolute_path)
        if err.validator == "additionalProperties" and isinstance(err.instance, Mapping):
            valid = sorted(err.schema.get("properties", {}))
            for extra in sorted(set(err.instance) - set(valid)):
                near = difflib.get_close_matches(str(extra), valid, n=3, cutoff=0.5)
                hint = f"did you mean {' or '.join(near)}? " if near else ""
                lines.append(f"{where}: unknown key {extra!r}; {hint}valid keys here: {', '.join(valid)}")
        elif err.validator == "type":
            lines.append(f"{where}: {_short(err.instance)} is not of type {err.validator_value}")
        elif len(err.message) <= 160:
            lines.append(f"{where}: {err.message}")
        else:  # jsonschema quotes whole sections for some validators
            lines.append(f"{where}: {_short(err.instance)} is invalid ({err.validator}: "
                         f"{_short(err.validator_value)})")
    return lines


def non_finite(config, path=()) -> list[str]:
    """Keys holding NaN or an infinity: every schema bound compares false against NaN."""
    import math

    if isinstance(config, float) and not math.isfinite(config):
        return [_key(path)]
    if isinstance(config, Mapping):
        return [k for key, v in config.items() for k in non_finite(v, (*path, key))]
    if isinstance(config, (list, tuple)):
        return [k for i, v in enumerate(config) for k in non_finite(v, (*path, i))]
    return []


def check_schema(config: Mapping, schema: Mapping, context: str = "") -> None:
    """Reject a config the schema does not accept, in a few lines (not the whole schema)."""
    bad = [f"{k}: must be a finite number" for k in non_finite(config)]
    problems = bad + schema_errors(config, schema)
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ConfigError(f"invalid config{context}:\n  " + "\n  ".join(problems[:10]) + more)


def sort_keys(x):
    """``x`` with every mapping's keys in sorted order. Snakemake records params as ``repr``, in
    which a dict's key order shows, so the same settings written in another order (or merged from
    a second ``--configfile``) would otherwise count as changed params and rerun their rules."""
    if isinstance(x, Mapping):
        return {k: sort_keys(x[k]) for k in sorted(x, key=str)}
    if isinstance(x, list):
        return [sort_keys(v) for v in x]
    return x
