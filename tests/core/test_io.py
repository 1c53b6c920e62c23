import pandas as pd
import pytest

from refusal_atlas.core.io import atomic_path, write_json, write_parquet


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.parquet"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half a file")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_failed_directory_write_keeps_the_old_output(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target, is_dir=True) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed")
    assert (target / "weights").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model"]
    with atomic_path(target, is_dir=True) as tmp:
        (tmp / "weights").write_text("new")
    assert (target / "weights").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_writers_round_trip(tmp_path):
    write_parquet(pd.DataFrame({"a": [1, 2]}), tmp_path / "x.parquet")
    assert pd.read_parquet(tmp_path / "x.parquet").a.tolist() == [1, 2]
    write_json({"n": 3}, tmp_path / "x.json")
    assert (tmp_path / "x.json").read_text().strip() == '{\n  "n": 3\n}'


def test_json_outputs_are_strict_json_with_null_for_nan(tmp_path):
    import json
    import math

    from refusal_atlas.core.io import write_json

    write_json({"score": math.nan, "rates": [0.5, float("nan")], "n": 3}, tmp_path / "s.json")
    text = (tmp_path / "s.json").read_text()
    assert "NaN" not in text
    assert json.loads(text) == {"score": None, "rates": [0.5, None], "n": 3}


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775),
                                                         (0o077, 0o600, 0o700)])
def test_outputs_honour_the_umask(tmp_path, umask, file_mode, dir_mode):
    import os
    import stat

    old = os.umask(umask)
    try:
        write_json({"n": 1}, tmp_path / "a.json")
        with atomic_path(tmp_path / "model", is_dir=True) as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "w.bin").write_bytes(b"x")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "a.json") == file_mode
    assert mode(tmp_path / "model") == dir_mode and mode(tmp_path / "model" / "sub") == dir_mode
    assert mode(tmp_path / "model" / "sub" / "w.bin") == file_mode


def test_table_cells_are_escaped():
    from refusal_atlas.core.io import table_html

    page = table_html(pd.DataFrame({"generation": ["<script>alert(1)</script> & co"]}), "t", "t.csv")
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page


def test_a_killed_writers_temporary_is_cleared_by_the_next_write(tmp_path):
    (tmp_path / ".out.json.abc123.tmp").write_text("half")  # what kill -9 leaves
    (tmp_path / ".model.x1.tmp").mkdir()
    (tmp_path / ".other.json.x.tmp").write_text("another output's")
    write_json({"n": 1}, tmp_path / "out.json")
    with atomic_path(tmp_path / "model", is_dir=True) as tmp:
        (tmp / "w").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.json.x.tmp", "model", "out.json"]


def test_the_same_table_makes_the_same_page():
    from refusal_atlas.core.io import table_html

    df = pd.DataFrame({"a": [1.5, 2.0], "b": ["x", "y"]})
    assert table_html(df, "t", "t.csv") == table_html(df.copy(), "t", "t.csv")
