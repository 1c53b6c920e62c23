"""The light stages (tables.py) must not import torch or transformers: their many small jobs
(downloads, prompt sets, gathering, judging, tables, figures) would each pay about 6 s for it."""

import subprocess
import sys

from conftest import ROOT

HEAVY = ("torch", "transformers", "sae_lens", "transformer_lens", "matplotlib")


def test_tables_imports_no_model_library():
    code = "import sys, refusal_atlas.tables; print(' '.join(m for m in %r if m in sys.modules))" % (HEAVY,)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "", f"refusal_atlas.tables imports {res.stdout.strip()}"


def test_scripts_of_the_light_stages_import_tables_only():
    for rule in ("download_dataset", "build_promptsets", "organism_figure", "direction_figure",
                 "sae_quality_figure", "sae_quality_table", "gather_generations", "judge", "summarize_scores"):
        text = (ROOT / "workflow/scripts" / f"{rule}.py").read_text()
        assert "from refusal_atlas import tables\n" in text and "stages" not in text, rule
        assert f"tables.{rule}(" in text, rule
