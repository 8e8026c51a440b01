"""The Python API: ``import ditgraft`` stays cheap, and the README's example runs as written (in a temp dir)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_is_lazy():
    code = "import sys, ditgraft; print('ditgraft.api' in sys.modules, 'torch' in sys.modules, ditgraft.__all__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": ROOT}).stdout
    assert out.startswith("False False") and "run_pipeline" in out
    import ditgraft

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ditgraft.nope  # noqa: B018


def test_readme_example_runs(tmp_path, monkeypatch):
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    code = re.search(r"<!-- api-example -->\n```python\n(.*?)```\n<!-- /api-example -->", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 10
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
    assert scope["images"].shape == (20, 32, 32, 1) and list(scope["labels"][:11]) == [*range(10), 0]
    assert scope["report"]["eval"]["grafted"]["num"] == 20
    assert type(scope["student"].blocks[1].attn).__name__ == "HyenaX"
    assert os.path.exists(tmp_path / "runs" / "notebook" / "report.md")


def test_graft_model_takes_a_recipe_or_arguments():
    import ditgraft
    from helpers import tiny_dit

    model = tiny_dit(depth=4)
    a = ditgraft.graft_model(model, operator="mlp", layers=[0, 2], options={"ratio": 2})
    b = ditgraft.graft_model(model, {"grafts": [{"slot": "mlp", "layers": [0, 2], "operator": "mlp",
                                                 "options": {"ratio": 2}}]})
    assert a.blocks[0].mlp.hidden == 2 * 32 and a.blocks[1].mlp.hidden == 4 * 32
    assert all((p == q).all() for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="either recipe"):
        ditgraft.graft_model(model)
