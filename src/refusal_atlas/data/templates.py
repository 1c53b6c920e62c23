"""Prompt templates read out of third-party source files, never executed.

A reference implementation keeps its judge prompt as a Python constant; a workflow that must not
copy that text (no licence is stated) downloads the file, pinned, and reads the string with ``ast``.
Standard library only: the vLLM environment imports it through the HarmBench judge.
"""

from __future__ import annotations

import ast
import string
from pathlib import Path


def read_prompt_template(path: str | Path, name: str = "LLAMA2_CLS_PROMPT") -> str:
    """The classifier prompt that a Python source file assigns to ``name`` at its top level: a
    string, or a dict whose "prompt" holds it (as HarmBench's eval_utils.py keeps its templates).

    The file is parsed, never run; the template must take exactly ``{behavior}`` and ``{generation}``.
    """
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not Python source ({e})") from None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                raise ValueError(f"{path}: {name} is not a literal string or dict") from None
            template = value.get("prompt") if isinstance(value, dict) else value
            if not isinstance(template, str):
                raise ValueError(f"{path}: {name} holds no prompt string")
            _check_template(template, f"{path}: {name}")
            return template
    raise ValueError(f"{path}: no top-level assignment to {name}")


def _check_template(template: str, where: str) -> None:
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    if fields != {"behavior", "generation"}:
        raise ValueError(f"{where}: the template's fields are {sorted(fields)}, not behavior and generation")
