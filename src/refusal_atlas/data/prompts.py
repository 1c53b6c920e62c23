"""Prompt sets with the contract columns (id, instruction, category, label, source, split).

Extra columns: ``variant`` (plain, twin, jailbreak, bait) and ``pair_id`` (the harmful/harmless
pair or the plain parent of a jailbreak), so that matched comparisons stay possible downstream.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import yaml

from refusal_atlas.core.io import read_lines
from refusal_atlas.data.datasets import read_catqa, read_or_bench

CONTRACT_COLUMNS = ["id", "instruction", "category", "label", "source", "split"]
COLUMNS = CONTRACT_COLUMNS + ["variant", "pair_id"]
SPLITS = ("train", "val", "test")


class PromptSetError(ValueError):
    """A prompt file or dataset does not have the expected shape."""


def _unit_hash(key: str, seed: int) -> float:
    """A stable number in [0, 1) for ``key``: splits never depend on row order or Python's hash."""
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def assign_split(key: str, fractions: Mapping[str, float], seed: int = 0) -> str:
    """Deterministic train/val/test assignment of one key with the given fractions."""
    total = sum(fractions[s] for s in SPLITS)
    if abs(total - 1.0) > 1e-6:
        raise PromptSetError(f"split fractions must sum to 1, got {total}")
    u, acc = _unit_hash(key, seed), 0.0
    for s in SPLITS:
        acc += fractions[s]
        if u < acc:
            return s
    return SPLITS[-1]


def _read_tsv(path: Path, required: list[str]) -> pd.DataFrame:
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    missing = set(required) - set(df.columns)
    if missing:
        raise PromptSetError(f"{path}: missing columns {sorted(missing)}")
    empty = df[required].eq("").any(axis=1)
    if empty.any():
        raise PromptSetError(f"{path}: empty fields on rows {list(df.index[empty] + 2)}")
    dup = df[required[0]].duplicated()
    if dup.any():
        raise PromptSetError(f"{path}: duplicate ids {sorted(df.loc[dup, required[0]])}")
    return df


def wrap_jailbreak(template: str, request: str) -> str:
    if "{request}" not in template:
        raise PromptSetError("a jailbreak template must contain '{request}'")
    return template.replace("{request}", request)


def read_suffixes(path: str | Path) -> list[str]:
    """Adversarial suffixes, one per line; blank lines and ``#`` comments are skipped."""
    suffixes = read_lines(path)
    if not suffixes:
        raise PromptSetError(f"{path}: no adversarial suffix in the file")
    return suffixes


def bundled_promptset(prompt_dir: str | Path, fractions: Mapping[str, float], seed: int = 0,
                      suffixes: Sequence[str] = ()) -> pd.DataFrame:
    """The prompt sets written for refusal-atlas (``resources/prompts``).

    Harmful requests and their harmless twins share a split (assigned by pair id), so no twin
    of a test prompt is ever trained on; each jailbreak variant shares its parent's split.
    ``suffixes`` (:func:`read_suffixes`) add a second jailbreak variant per harmful request.
    """
    prompt_dir = Path(prompt_dir)
    pairs = _read_tsv(prompt_dir / "pairs.tsv", ["pair_id", "category", "harmful", "harmless"])
    bait = _read_tsv(prompt_dir / "safe_bait.tsv", ["id", "category", "instruction"])
    templates = yaml.safe_load((prompt_dir / "jailbreak_templates.yaml").read_text())
    rows = []
    for p in pairs.itertuples(index=False):
        split = assign_split(p.pair_id, fractions, seed)
        rows.append((f"{p.pair_id}-harmful", p.harmful, p.category, "harmful", "bundled", split, "plain", p.pair_id))
        rows.append((f"{p.pair_id}-harmless", p.harmless, p.category, "harmless", "bundled", split, "twin", p.pair_id))
        # A hash of its own: with the split's, each split would get its own band of wrappers.
        t = templates[int(_unit_hash(f"{p.pair_id}/wrapper", seed) * len(templates))]
        rows.append(
            (f"{p.pair_id}-jb-{t['id']}", wrap_jailbreak(t["text"], p.harmful), p.category, "harmful",
             "bundled", split, "jailbreak", p.pair_id)
        )
        if suffixes:
            i = int(_unit_hash(f"{p.pair_id}/suffix", seed) * len(suffixes))
            rows.append((f"{p.pair_id}-jb-suffix-{i + 1}", f"{p.harmful} {suffixes[i]}", p.category, "harmful",
                         "bundled", split, "jailbreak", p.pair_id))
    for b in bait.itertuples(index=False):
        rows.append((b.id, b.instruction, b.category, "harmless", "bundled", assign_split(b.id, fractions, seed),
                     "bait", b.id))
    return pd.DataFrame(rows, columns=COLUMNS)


CONTRAST_TYPES = ("figurative", "safe_context", "absurd_real_group", "homonym", "fictional_privacy",
                  "nonsense_group", "safe_target", "history", "public_figure", "definition")


def contrast_promptset(path: str | Path, fractions: Mapping[str, float], seed: int = 0) -> pd.DataFrame:
    """Safe prompts that look unsafe (``resources/prompts/contrast.tsv``, written for refusal-atlas),
    each beside an unsafe request that shares its alarming word: the unsafe one a ``plain`` harmful
    prompt, the safe one its harmless ``twin``, both under the pair's split (by pair id, so the two
    never straddle train and test) and with the type of safe prompt as the category.

    A model that refuses the safe side refuses a word, not a harm (over-refusal by type).
    """
    pairs = _read_tsv(Path(path), ["pair_id", "type", "word", "safe", "unsafe"])
    unknown = sorted(set(pairs.type) - set(CONTRAST_TYPES))
    if unknown:
        raise PromptSetError(f"{path}: unknown contrast type(s) {unknown}; known: {list(CONTRAST_TYPES)}")
    unshared = [p.pair_id for p in pairs.itertuples() if p.word.lower() not in p.safe.lower()
                or p.word.lower() not in p.unsafe.lower()]
    if unshared:
        raise PromptSetError(f"{path}: pairs {unshared[:5]} do not share their word between the safe and unsafe "
                             "prompt")
    rows = []
    for p in pairs.itertuples(index=False):
        split = assign_split(p.pair_id, fractions, seed)
        rows.append((f"{p.pair_id}-unsafe", p.unsafe, p.type, "harmful", "contrast", split, "plain", p.pair_id))
        rows.append((f"{p.pair_id}-safe", p.safe, p.type, "harmless", "contrast", split, "twin", p.pair_id))
    return pd.DataFrame(rows, columns=COLUMNS)


def load_instructions(path: Path) -> list[dict]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list) or not all(isinstance(x, dict) and "instruction" in x for x in data):
        raise PromptSetError(f"{path}: expected a JSON list of objects with 'instruction'")
    return data


def refusal_direction_promptset(
    files: Mapping[str, str | Path], max_per_split: Mapping[str, int], seed: int = 0,
    labels: Sequence[str] = ("harmful", "harmless"),
) -> pd.DataFrame:
    """Arditi et al.'s harmful/harmless splits (``{label}_{split}`` -> path), subsampled per split."""
    rows = []
    for label in labels:
        for split in SPLITS:
            key = f"{label}_{split}"
            items = load_instructions(Path(files[key]))
            idx = list(range(len(items)))
            random.Random(f"{seed}:{key}").shuffle(idx)
            for i in sorted(idx[: max_per_split[split]]):
                rows.append(
                    (f"rd-{key}-{i:05d}", items[i]["instruction"], items[i].get("category") or "none", label,
                     "refusal_direction", split, "plain", f"rd-{key}-{i:05d}")
                )
    return pd.DataFrame(rows, columns=COLUMNS)


WILDJAILBREAK_TYPES = ("adversarial_harmful", "vanilla_harmful", "vanilla_benign", "adversarial_benign")


def _read_wildjailbreak(path: str | Path, required: set[str]) -> pd.DataFrame:
    # The dataset card reads it with delimiter "\t" and keep_default_na=False ("None" is a prompt).
    try:
        df = pd.read_csv(path, sep="\t", keep_default_na=False, dtype=str)
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise PromptSetError(f"{path}: not a WildJailbreak TSV ({e})") from e
    missing = required - set(df.columns)
    if missing:
        raise PromptSetError(f"{path}: not a WildJailbreak TSV, columns {sorted(missing)} are missing")
    unknown = set(df.data_type) - set(WILDJAILBREAK_TYPES)
    if unknown:
        raise PromptSetError(f"{path}: unknown data_type {sorted(unknown)[:3]}")
    return df


def _wjb_id(text: str) -> str:
    return "wjb-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def wildjailbreak_promptset(train: str | Path, eval_path: str | Path | None, fractions: Mapping[str, float],
                            max_per_type: Mapping[str, int], seed: int = 0) -> pd.DataFrame:
    """WildJailbreak (Jiang et al. 2024, ``allenai/wildjailbreak``, gated) as a promptset.

    From the ``train`` TSV: each adversarial_harmful prompt becomes a ``jailbreak`` variant paired
    (``pair_id``) with its vanilla request, a ``plain`` harmful prompt that appears once however
    many adversarial rewrites it has; vanilla_harmful and vanilla_benign prompts are ``plain``
    harmful and harmless prompts; adversarial_benign ones are ``bait``. At most
    ``max_per_type[data_type]`` rows of each type are drawn (seeded); splits are assigned by a
    hash of the pair. From the ``eval`` TSV (optional): adversarial_harmful prompts, which have
    no vanilla parent, join the test split as unpaired jailbreaks, and adversarial_benign as bait.
    """
    df = _read_wildjailbreak(train, {"vanilla", "adversarial", "data_type"})
    rows, plain_seen = [], set()
    for dtype in WILDJAILBREAK_TYPES:
        part = df[df.data_type == dtype]
        part = part.sample(n=min(len(part), max_per_type.get(dtype, 0)), random_state=seed).sort_index()
        for r in part.itertuples():
            adversarial = dtype.startswith("adversarial")
            label = "harmful" if dtype.endswith("harmful") else "harmless"
            key = r.vanilla if r.vanilla else r.adversarial
            pair = _wjb_id(key)
            split = assign_split(pair, fractions, seed)
            if dtype == "adversarial_harmful":
                if pair not in plain_seen:
                    plain_seen.add(pair)
                    rows.append((f"{pair}-plain", r.vanilla, "none", "harmful", "wildjailbreak", split, "plain", pair))
                rows.append((f"{pair}-jb-wildjailbreak-{r.Index}", r.adversarial, "none", "harmful", "wildjailbreak",
                             split, "jailbreak", pair))
            elif adversarial:
                rows.append((f"{pair}-bait-{r.Index}", r.adversarial, "none", label, "wildjailbreak", split, "bait", pair))
            elif pair not in plain_seen:
                plain_seen.add(pair)
                rows.append((f"{pair}-plain", r.vanilla, "none", label, "wildjailbreak", split, "plain", pair))
    if eval_path is not None:
        ev = _read_wildjailbreak(eval_path, {"adversarial", "data_type"})
        for r in ev[ev.data_type.str.startswith("adversarial")].itertuples():
            harmful = r.data_type == "adversarial_harmful"
            pair = f"wjb-eval-{r.Index:05d}"
            rows.append((f"{pair}-jb-wildjailbreak-eval" if harmful else f"{pair}-bait", r.adversarial, "none",
                         "harmful" if harmful else "harmless", "wildjailbreak_eval", "test",
                         "jailbreak" if harmful else "bait", pair))
    out = pd.DataFrame(rows, columns=COLUMNS)
    if out.empty:
        raise PromptSetError(f"{train}: no prompt drawn (max_per_type {dict(max_per_type)})")
    return out


def benchmark_promptset(path: str | Path, name: str, max_prompts: int | None) -> pd.DataFrame:
    """A public harmful benchmark (HarmBench, JailbreakBench, AdvBench, ...) as a test split.

    Yeo et al. 2025 §4.1 score the first 100 prompts of each, in file order; so does this.
    """
    items = load_instructions(Path(path))[:max_prompts]
    rows = [(f"{name}-{i:04d}", x["instruction"], x.get("category") or "none", "harmful", name, "test", "plain",
             f"{name}-{i:04d}") for i, x in enumerate(items)]
    return pd.DataFrame(rows, columns=COLUMNS)


def category_slug(name: str) -> str:
    """A category as a file-name-safe key (CatQA has "Hate/Harass/Violence"): lower case, runs of
    anything but letters and digits as one underscore."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "none"


def catqa_promptset(path: str | Path, harmless: Mapping[str, str | Path], fractions: Mapping[str, float],
                    max_per_split: Mapping[str, int], seed: int = 0) -> pd.DataFrame:
    """CatQA (Bhardwaj et al. 2024, ``declare-lab/CategoricalHarmfulQA``, English): every question as
    a plain harmful prompt of its category (Yeo et al. 2025 §4.2), split by a hash of its id.

    CatQA has no harmless prompts; the harmless side of the per-category directions is
    refusal_direction's harmless splits (``harmless_{split}`` -> path), subsampled per split.
    """
    rows = []
    for i, x in enumerate(read_catqa(path)):
        pid = f"catqa-{i:04d}"
        rows.append((pid, x["Question"], category_slug(x["Category"]), "harmful", "catqa",
                     assign_split(pid, fractions, seed), "plain", pid))
    safe = refusal_direction_promptset(harmless, max_per_split, seed, labels=("harmless",))
    return pd.concat([pd.DataFrame(rows, columns=COLUMNS), safe.assign(category="none")], ignore_index=True)


def or_bench_promptset(toxic: str | Path, hard: str | Path, extra: str | Path | None, fractions: Mapping[str, float],
                       max_extra: int, seed: int = 0) -> pd.DataFrame:
    """OR-Bench (Cui et al. 2024) by category: ``or-bench-toxic`` as plain harmful prompts, and the
    seemingly toxic but safe prompts of ``or-bench-hard-1k`` (plus at most ``max_extra`` more of
    ``or-bench-80k``, seeded, none already in hard-1k) as harmless bait of the same categories.
    Each prompt's split is a hash of its id.
    """
    rows = []

    def add(indexed, tag, label, variant):
        for i, x in indexed:
            pid = f"orb-{tag}-{i:05d}"
            rows.append((pid, x["prompt"], category_slug(x["category"]), label, f"or-bench-{tag}",
                         assign_split(pid, fractions, seed), variant, pid))

    add(enumerate(read_or_bench(toxic)), "toxic", "harmful", "plain")
    hard_items = read_or_bench(hard)
    add(enumerate(hard_items), "hard-1k", "harmless", "bait")
    if extra is not None and max_extra > 0:
        seen = {x["prompt"] for x in hard_items}
        pool = [(i, x) for i, x in enumerate(read_or_bench(extra)) if x["prompt"] not in seen]
        random.Random(f"{seed}:or-bench-80k").shuffle(pool)
        add(sorted(pool[:max_extra], key=lambda t: t[0]), "80k", "harmless", "bait")
    return pd.DataFrame(rows, columns=COLUMNS)


# ---------------------------------------------------------------------------- selectors
def plain_prompts(index: pd.DataFrame) -> pd.DataFrame:
    """Plain harmful requests and their harmless twins: no jailbreak wrappers, no bait."""
    return index[index.variant.isin(["plain", "twin"])]


def sample_rows(df: pd.DataFrame, cap: int | None, seed: int = 0) -> pd.DataFrame:
    return df if cap is None or len(df) <= cap else df.sample(n=cap, random_state=seed).sort_index()


def sample_each(df: pd.DataFrame, by: str | list[str], cap: int | None, seed: int = 0) -> pd.DataFrame:
    """``sample_rows`` of every group, the grouping columns kept (pandas 3's apply drops them)."""
    if df.empty:
        return df
    return pd.concat([sample_rows(g, cap, seed) for _, g in df.groupby(by, sort=True)]).reset_index(drop=True)
