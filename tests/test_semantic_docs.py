"""The Python blocks of `docs/semantic.md` run as written (in a fresh interpreter, in a scratch folder)."""

import re

import pytest

from test_documentation import REPO_ROOT, python_blocks, run_documents


@pytest.mark.slow  # trains, searches and exports in a fresh interpreter: minutes on two shared cores
def test_semantic_quickstart_runs(tmp_path):
    blocks = python_blocks((REPO_ROOT / "docs" / "semantic.md").read_text(encoding="utf-8"))
    runnable = [code for code, reason in blocks if reason is None]
    assert len(runnable) == 4 and len(blocks) == 5
    output = run_documents([runnable], cwd=tmp_path)
    assert "6 {'background': 0" in output
    assert "SamSubnetForSemanticSegmentation" in output
    assert re.search(r"^\(\d+, \d+\) \[", output, re.MULTILINE)  # the ONNX class map and the classes in it
    # The not-run block names only what exists.
    skipped = [code for code, reason in blocks if reason is not None]
    assert "from_ade20k" in skipped[0]
    import mpsupernet.data

    assert callable(mpsupernet.data.from_ade20k)
