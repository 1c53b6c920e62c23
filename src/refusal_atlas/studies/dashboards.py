"""Feature dashboards: one self-contained HTML page per selected refusal feature.

A page follows the feature dashboards of Bricken et al. (2023, "Towards Monosemanticity", the
top-activating contexts with per-token highlighting) and adds the refusal evidence of Yeo et al.
(2025): the feature's rank and score under each selector (§3: CosSim, ActDiff, AP, LA-IG Eq. 4),
the cosine of its decoder row with the refusal direction r, its mean activation on harmful and
harmless prompts, and the change of the refusal score (Arditi et al. 2024, §C) when it alone is
clamped, f ← c·f, with the error term kept.

sae-dashboard, the field's renderer, pins transformers < 4.57 and safetensors < 0.5, needs a
HookedTransformer, and its pages load d3 and plotly from CDNs, so a page here is plain HTML
(Jinja2) with no network dependency: it must render inside the offline Snakemake report.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from refusal_atlas.core.stats import bootstrap_mean
from refusal_atlas.features.direction import last_token_logprobs, refusal_score
from refusal_atlas.lm.generation import chat_batches
from refusal_atlas.lm.modeling import LayerGrab
from refusal_atlas.saes.corpus import token_mask
from refusal_atlas.steering.clamp import FeatureClamp, FeatureSet

METHOD_NAMES = {"cossim": "CosSim", "actdiff": "ActDiff", "ap": "AP", "la_ig": "LA-IG"}


@dataclass(frozen=True)
class DashboardConfig:
    """``top_k`` contexts per feature, from at most ``max_prompts`` prompts scanned."""

    top_k: int = 6
    max_prompts: int = 400
    effect_prompts: int = 32
    batch_size: int = 16
    seed: int = 0


def selected_features(tables: Mapping[str, pd.DataFrame], facts_protocol: str = "heldout"
                      ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The union of every selector's global sets, and each set's ranks and scores (long form).

    Returns ``(features, ranks)``: ``features`` has one row per ``(layer, feature)`` with its
    cosine with r and mean activations, read from ``facts_protocol``'s evidence where that
    protocol selected the feature (r and the statistics depend on the prompts a protocol fits
    on); ``ranks`` has one row per feature, method and protocol.
    """
    frames = [t[t.scope == "global"].assign(method=m) for m, t in tables.items()]
    ranks = pd.concat(frames, ignore_index=True)[
        ["layer", "feature", "method", "protocol", "rank", "score", "cos_r", "mean_act_harmful", "mean_act_harmless"]]
    ranks[["layer", "feature", "rank"]] = ranks[["layer", "feature", "rank"]].astype(int)
    order = ranks.assign(other=ranks.protocol != facts_protocol).sort_values(["other", "rank", "method"])
    feats = (order.groupby(["layer", "feature"], sort=False)
             .agg(facts_protocol=("protocol", "first"), cos_r=("cos_r", "first"),
                  mean_act_harmful=("mean_act_harmful", "first"), mean_act_harmless=("mean_act_harmless", "first"))
             .join(ranks.groupby(["layer", "feature"]).agg(best_rank=("rank", "min"), n_sets=("method", "size")))
             .reset_index())
    return feats.sort_values(["best_rank", "n_sets", "layer", "feature"], ascending=[True, False, True, True],
                             ignore_index=True), ranks.drop(columns=["cos_r", "mean_act_harmful", "mean_act_harmless"])


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token as the text it adds (byte-level BPE markers resolved)."""
    return [tokenizer.convert_tokens_to_string([t]) for t in tokenizer.convert_ids_to_tokens(list(ids))]


@torch.no_grad()
def scan_prompts(model, tokenizer, instructions: Sequence[str], saes: Mapping[int, object],
                 features: pd.DataFrame, batch_size: int = 16, system_prompt: str | None = None) -> list[dict]:
    """Per prompt: its token strings (special tokens left out) and, per layer, the ``[tokens,
    features]`` activations of that layer's selected features (in ``features``' order)."""
    by_layer = _by_layer(features)
    missing = set(by_layer) - set(saes)
    if missing:
        raise ValueError(f"selected features at layers {sorted(missing)} have no SAE")
    device = next(model.parameters()).device
    per_prompt: list[dict] = [{}] * len(instructions)
    with LayerGrab(model, list(by_layer)) as grab, tqdm(total=len(instructions), desc="contexts", unit="prompt") as bar:
        for idx, enc in chat_batches(tokenizer, list(instructions), batch_size, system_prompt, device):
            hidden = grab.run(enc)
            keep = token_mask(tokenizer, enc).cpu()
            acts = {}
            for layer, feats in by_layer.items():
                sae = saes[layer]
                h = hidden[layer].to(sae.W_enc.device, sae.dtype)
                acts[layer] = sae.encode(h)[..., torch.as_tensor(feats, device=sae.W_enc.device)].float().cpu()
            ids = enc["input_ids"].cpu()
            for row, i in enumerate(idx):
                m = keep[row]
                per_prompt[i] = {"tokens": token_strings(tokenizer, ids[row][m].tolist()),
                                 **{l: a[row][m].numpy() for l, a in acts.items()}}
            bar.update(len(idx))
    return per_prompt


def _by_layer(features: pd.DataFrame) -> dict[int, np.ndarray]:
    return {int(l): g.feature.to_numpy(dtype=np.int64, copy=True) for l, g in features.groupby("layer")}


def _peaks(per_prompt: Sequence[dict], layer: int, width: int) -> np.ndarray:
    """``[prompts, features]`` maximum activation over each prompt's real tokens."""
    return np.array([p[layer].max(0) if len(p["tokens"]) else np.zeros(width) for p in per_prompt])


def top_contexts(model, tokenizer, instructions: Sequence[str], saes: Mapping[int, object],
                 features: pd.DataFrame, top_k: int, batch_size: int = 16,
                 system_prompt: str | None = None) -> pd.DataFrame:
    """The ``top_k`` prompts of each feature by its maximum activation over real tokens.

    Rows: ``layer, feature, prompt, max_act, tokens, acts`` (one per feature and context; the
    token strings and the feature's activation at each, special tokens left out).
    """
    per_prompt = scan_prompts(model, tokenizer, instructions, saes, features, batch_size, system_prompt)
    rows = []
    for layer, feats in _by_layer(features).items():
        peak = _peaks(per_prompt, layer, len(feats))
        for j, f in enumerate(feats):
            for i in np.argsort(-peak[:, j], kind="stable")[:top_k]:
                if peak[i, j] <= 0:
                    break
                p = per_prompt[i]
                rows.append({"layer": int(layer), "feature": int(f), "prompt": int(i), "max_act": float(peak[i, j]),
                             "tokens": p["tokens"], "acts": p[layer][:, j].round(4).tolist()})
    return pd.DataFrame(rows, columns=["layer", "feature", "prompt", "max_act", "tokens", "acts"])


CONTRAST_COLUMNS = ["layer", "feature", "type", "n_pairs", "safe_fire", "unsafe_fire", "safe_peak", "unsafe_peak",
                    "top_safe", "top_safe_act"]


def contrast_profile(model, tokenizer, pairs: pd.DataFrame, saes: Mapping[int, object], features: pd.DataFrame,
                     batch_size: int = 16, system_prompt: str | None = None) -> pd.DataFrame:
    """How each feature treats safe prompts that look unsafe, per type of the contrast set.

    ``pairs`` holds a contrast promptset's rows (``pair_id, category, label, instruction``): each
    safe prompt beside an unsafe request that shares its alarming word. Per feature and type: the
    share of safe and of unsafe prompts on which it fires (maximum activation over real tokens
    above 0), the mean of those maxima, and the safe prompt it fires on most. A feature that fires
    on the safe prompts as often as on the unsafe ones tracks the word, not the harm.
    """
    pairs = pairs.reset_index(drop=True)
    per_prompt = scan_prompts(model, tokenizer, list(pairs.instruction), saes, features, batch_size, system_prompt)
    safe = (pairs.label == "harmless").to_numpy()
    rows = []
    for layer, feats in _by_layer(features).items():
        peak = _peaks(per_prompt, layer, len(feats))
        for j, f in enumerate(feats):
            for t, idx in [("all", pairs.index), *pairs.groupby("category").groups.items()]:
                idx = np.asarray(idx)
                s, u = idx[safe[idx]], idx[~safe[idx]]
                top = s[np.argmax(peak[s, j])] if len(s) else None
                rows.append({"layer": int(layer), "feature": int(f), "type": t, "n_pairs": len(s),
                             "safe_fire": float((peak[s, j] > 0).mean()) if len(s) else np.nan,
                             "unsafe_fire": float((peak[u, j] > 0).mean()) if len(u) else np.nan,
                             "safe_peak": float(peak[s, j].mean()) if len(s) else np.nan,
                             "unsafe_peak": float(peak[u, j].mean()) if len(u) else np.nan,
                             "top_safe": None if top is None else str(pairs.instruction[top]),
                             "top_safe_act": None if top is None else float(peak[top, j])})
    return pd.DataFrame(rows, columns=CONTRAST_COLUMNS)


def _one_feature_set(layer: int, feature: int, d_sae: int) -> FeatureSet:
    mask = torch.zeros(1, d_sae, dtype=torch.bool)
    mask[0, feature] = True
    return FeatureSet({layer: mask}, {layer: torch.ones(1, d_sae)})


def clamp_effects(model, tokenizer, instructions: Sequence[str], saes: Mapping[int, object], features: pd.DataFrame,
                  value: float, refusal_ids: Sequence[int], boot: Mapping, batch_size: int = 16,
                  reference: pd.DataFrame | None = None, system_prompt: str | None = None) -> pd.DataFrame:
    """Change of the refusal score (last prompt token) when each feature alone is clamped, f ← c·f.

    One row per feature: the mean paired change over ``instructions`` with its n and bootstrap
    interval. ``reference``, if given, is clamped as one set too (row ``set="reference"``), the
    scale against which one feature's effect is read.
    """
    def score(intervention=None) -> np.ndarray:
        lp = last_token_logprobs(model, tokenizer, list(instructions), intervention=intervention,
                                 batch_size=batch_size, system_prompt=system_prompt)
        return refusal_score(lp, refusal_ids).numpy()

    def row(delta: np.ndarray, **key) -> dict:
        r = bootstrap_mean(delta, n_resamples=boot["n_resamples"], confidence=boot["confidence"], seed=boot["seed"])
        return {**key, "value": value, "delta_refusal_score": r.rate, "ci_low": r.ci_low, "ci_high": r.ci_high,
                "n": r.n}

    base = score()
    rows = []
    for layer, feature in tqdm(list(zip(features.layer, features.feature)), desc="clamp alone", unit="feature"):
        sae = saes[int(layer)]
        fs = _one_feature_set(int(layer), int(feature), sae.cfg.d_sae)
        clamp = FeatureClamp({int(layer): sae}, fs, mode="multiply", value=value)
        rows.append(row(score(clamp) - base, set="alone", layer=int(layer), feature=int(feature)))
    if reference is not None and len(reference):
        masks, scale = {}, {}
        for layer, g in reference.groupby("layer"):
            d = saes[int(layer)].cfg.d_sae
            masks[int(layer)] = torch.zeros(1, d, dtype=torch.bool)
            masks[int(layer)][0, torch.as_tensor(g.feature.to_numpy(dtype=np.int64, copy=True))] = True
            scale[int(layer)] = torch.ones(1, d)
        clamp = FeatureClamp({l: saes[l] for l in masks}, FeatureSet(masks, scale), mode="multiply", value=value)
        rows.append(row(score(clamp) - base, set="reference", layer=-1, feature=-1))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- rendering
def _shade(act: float, peak: float) -> str:
    alpha = 0.0 if peak <= 0 else max(0.0, min(1.0, act / peak))
    return f"rgba(220, 80, 30, {alpha:.2f})"


def highlight(tokens: Sequence[str], acts: Sequence[float], peak: float) -> str:
    """Tokens as spans shaded by activation / ``peak``; the activation in each span's title."""
    out = []
    for t, a in zip(tokens, acts):
        text = html.escape(t).replace("\n", "↵<br>")
        out.append(f'<span class="tok" style="background:{_shade(a, peak)}" title="{a:.3f}">{text}</span>')
    return "".join(out)


def _environment():
    from jinja2 import Environment, select_autoescape

    env = Environment(autoescape=select_autoescape(default=True), trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = lambda x, d=3: "–" if x is None or x != x else f"{x:.{d}f}"
    return env


def _template(name: str):
    return _environment().from_string(files("refusal_atlas").joinpath("templates", name).read_text("utf-8"))


def page_name(rank: int, layer: int, feature: int) -> str:
    return f"{rank:03d}-L{layer}-F{feature}.html"


def render_page(feature: Mapping, ranks: pd.DataFrame, contexts: pd.DataFrame, prompts: pd.DataFrame,
                effect: Mapping | None, reference: Mapping | None, meta: Mapping,
                contrast: pd.DataFrame | None = None) -> str:
    """One feature's page. ``prompts`` holds the scanned prompts (instruction, label, split, variant);
    ``contrast`` the feature's rows of :func:`contrast_profile`, if any."""
    peak = float(contexts.max_act.max()) if len(contexts) else 0.0
    ctx = []
    for c in contexts.itertuples():
        p = prompts.iloc[c.prompt]
        ctx.append({"max_act": c.max_act, "label": p.label, "split": p.split, "variant": p.variant,
                    "html": highlight(c.tokens, c.acts, peak)})
    r = ranks.assign(method_name=ranks.method.map(lambda m: METHOD_NAMES.get(m, m))).sort_values(["method", "protocol"])
    return _template("feature.html.j2").render(f=feature, ranks=r.to_dict("records"), contexts=ctx, effect=effect,
                                               reference=reference, meta=meta, peak=peak,
                                               contrast=[] if contrast is None else contrast.to_dict("records"))
