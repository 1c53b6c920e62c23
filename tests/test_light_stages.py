"""The light stages (tables.py) must not import torch or transformers: their many small jobs
(downloads, prompt sets, gathering, judging, tables, figures) would each pay about 6 s for it."""

import inspect
import subprocess
import sys

from conftest import ROOT

from refusal_atlas import tables

HEAVY = ("torch", "transformers", "sae_lens", "transformer_lens", "matplotlib")


def test_tables_imports_no_model_library():
    code = "import sys, refusal_atlas.tables; print(' '.join(m for m in %r if m in sys.modules))" % (HEAVY,)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "", f"refusal_atlas.tables imports {res.stdout.strip()}"


def test_scripts_of_the_light_stages_import_tables_only():
    # every function of tables.py that a rule's script is named after is a light stage
    rules = [name for name, fn in inspect.getmembers(tables, inspect.isfunction)
             if fn.__module__ == tables.__name__ and (ROOT / "workflow/scripts" / f"{name}.py").exists()]
    assert {"download_dataset", "build_promptsets", "direction_figure", "judge"} <= set(rules), rules
    for rule in rules:
        text = (ROOT / "workflow/scripts" / f"{rule}.py").read_text()
        assert "from refusal_atlas import tables\n" in text and "stages" not in text, rule
        assert f"tables.{rule}(" in text, rule
