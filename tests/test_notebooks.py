"""The notebooks run from top to bottom against finished CPU twin runs, and are committed clean.

Executing them needs trained runs, so the test uses a working directory that already has them:
`EDGE_GLASS_TWINS_DIR` names it (configs/, data/, runs/ after the commands in the notebooks'
first cells, e.g. what tests/test_experiments.py trains). Without it the execution test is
skipped; a test that trains the twins can call `helpers.notebooks.execute_notebooks` itself.

    EDGE_GLASS_TWINS_DIR=/tmp/twins python -m pytest -q tests/test_notebooks.py
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

from helpers.notebooks import CELL_TIMEOUT_S, EXECUTED_DIR, execute_notebook, notebook_paths

TWINS_ENV = "EDGE_GLASS_TWINS_DIR"
STORE_NOTEBOOK = "00_feature_store"  # runs after the quickstart (tests/test_quickstart.py), not on the twins
EXPECTED = [STORE_NOTEBOOK, "01_vision_text_alignment", "02_trimodal_alignment", "03_trimodal_trm", "04_mrl_ablation",
            "05_perceiver_ablation"]


def test_notebooks_are_committed_without_outputs() -> None:
    assert [p.stem for p in notebook_paths()] == EXPECTED
    for path in notebook_paths():
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.cells[0].cell_type == "markdown", f"{path.name}: the first cell says what it shows"
        assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), f"{path.name}: no parameters cell"
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} cell {i} has outputs"


def _twins_dir() -> Path:
    value = os.environ.get(TWINS_ENV)
    if not value:
        pytest.skip(f"set {TWINS_ENV} to a working directory with trained CPU twins (configs/, data/, runs/) "
                    "to execute the notebooks (the test that trains the twins can call helpers.notebooks.execute_notebooks)")
    path = Path(value)
    if not (path / "runs").is_dir():
        pytest.fail(f"{TWINS_ENV}={value} has no runs/ directory")
    return path


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", EXPECTED[1:])  # 00 runs on the quickstart's output (tests/test_quickstart.py)
def test_notebook_executes(name: str) -> None:
    workdir = _twins_dir()
    path = next(p for p in notebook_paths() if p.stem == name)
    before = path.read_bytes()
    seconds = execute_notebook(path, workdir, timeout=CELL_TIMEOUT_S, out_dir=workdir / EXECUTED_DIR)
    print(f"{name}: {seconds:.1f} s")
    assert path.read_bytes() == before, "executing must not write into the repository's notebook"
    executed = nbformat.read(workdir / EXECUTED_DIR / path.name, as_version=4)
    images = sum("image/png" in o.get("data", {}) for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert images >= 2, f"{name}: expected its plots in the outputs, found {images} images"


# The helpers the notebooks call, on made-up records (no trained runs needed).


def test_use_workdir_finds_the_nearest_folder_with_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_glass import notebook_helpers as nb
    from edge_glass.utils.errors import UserError

    (tmp_path / "configs").mkdir()
    (tmp_path / "notebooks").mkdir()
    monkeypatch.delenv(nb.WORKDIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path / "notebooks")
    assert nb.use_workdir() == tmp_path.resolve() and Path.cwd() == tmp_path.resolve()
    monkeypatch.setenv(nb.WORKDIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="does not exist"):
        nb.use_workdir()


def test_plots_and_tables_from_records(capsys: pytest.CaptureFixture) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edge_glass import notebook_helpers as nb

    records = [{"kind": "train", "step": s, "loss": 20 / s, "lr": 1e-3, "samples_per_s": 100.0} for s in range(1, 11)]
    records.append({"kind": "eval", "step": 10, "val/mean_R@1": 0.5})
    fig = nb.plot_training_curves({"a": records, "b": records}, title="t")
    assert len([ax for ax in fig.axes if ax.has_data()]) == 4  # loss, lr, samples/s, val R@1
    rows = [{"variant": v, "checkpoint": "step10", "pair": "vision_text", "dim": d, "direction": direction,
             "R@1": 0.5, "R@5": 0.9, "MRR": 0.6, "median_rank": 1.0, "mean_rank": 2.0}
            for v, dims in (("dense", (16, 32)), ("coarse", (32,))) for d in dims
            for direction in ("text->vision", "vision->text")]
    report = {"experiment": "sweep", "split": "test", "variants": {"dense": ["model.mrl_dims=[16, 32]"], "coarse": []}, "rows": rows}
    nb.print_sweep_report(report)
    nb.print_sweep_tables(report)
    out = capsys.readouterr().out
    assert "model.mrl_dims=[16, 32]" in out and "–" in out  # coarse has no dim 16
    nb.plot_recall_vs_dim([r for r in rows if r["variant"] == "dense"])
    nb.plot_qa_rows([{"group": "all", "exact_match": 0.5, "token_f1": 0.6}, {"group": "qa/colour", "exact_match": 1.0}])
    nb.plot_halting({"halt_step": [1, 1, 2], "correct": [True, False, True], "attribute": ["a"] * 3, "n_sup": 3,
                     "exact_by_step": {1: 0.5, 2: 0.6, 3: 0.6}})
    plt.close("all")


def test_a_notebook_whose_runs_are_missing_stops_with_the_commands_that_make_them(tmp_path: Path) -> None:
    """Notebook 01 after only the quickstart (no CPU twins): its first code cell stops with the
    config header's commands, shown as lines, not a traceback from deep in the loader."""
    from edge_glass import notebook_helpers as nb
    from helpers.notebooks import NotebookFailed

    (tmp_path / "configs").symlink_to(Path(__file__).resolve().parents[1] / "configs")
    (tmp_path / "data" / "raw" / "synthetic").mkdir(parents=True)  # the quickstart's data, not the twins'
    with pytest.raises(nb.MissingInputs) as caught:
        os.chdir(tmp_path)
        try:
            nb.require("configs/cpu/vision_text_align.yaml", "configs/cpu/vision_text_qwen.yaml")
        finally:
            os.chdir(Path(__file__).resolve().parents[1])
    lines = caught.value._render_traceback_()
    assert "configs/cpu/vision_text_qwen.yaml: raw data data/raw/synthetic_cpu; feature store " in "\n".join(lines)
    commands = [ln.strip() for ln in lines if ln.startswith("  python ")]
    assert commands[:3] == [
        "python scripts/make_local_models.py --out models/local",
        "python scripts/download_datasets.py --dataset synthetic --num_samples 8000 --split_fractions 0.925 0.0375 "
        "0.0375 --image_size 32 --no_holdout --out data/raw/synthetic_cpu",
        "python scripts/extract_features.py --config configs/cpu/trimodal_align.yaml",
    ]
    assert "python scripts/train.py --config configs/cpu/vision_text_qwen.yaml" in commands

    path = next(p for p in notebook_paths() if p.stem == "01_vision_text_alignment")
    with pytest.raises(NotebookFailed) as failed:
        execute_notebook(path, tmp_path, timeout=CELL_TIMEOUT_S)
    text = str(failed.value)
    assert "MissingInputs" in text and "python scripts/train.py --config configs/cpu/vision_text_align.yaml" in text
    assert "Traceback" not in text and "File " not in text, "the commands, not a traceback"
