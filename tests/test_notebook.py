"""notebooks/quickstart.ipynb runs top to bottom (a shortened training run), so it cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    out = tmp_path / "quickstart"
    out.mkdir()
    # An earlier run's epoch file sorts before this run's chars.safetensors; the notebook must not evaluate it.
    (out / "chars-000001.safetensors").write_bytes(b"an earlier run's file")
    monkeypatch.setenv("QUICKSTART_OUT", str(out))
    monkeypatch.setenv("QUICKSTART_MAX_STEPS", "10")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel inherits this process's environment, so it runs the same interpreter and sees the variables.
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()

    assert (out / "chars.safetensors").is_file()
    assert list((out / "samples").glob("*.png"))
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the grids were shown
    report = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "concept score" in report and "prior drift" in report
