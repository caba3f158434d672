"""Execute the repository's notebooks against a working directory of finished runs.

`execute_notebooks(workdir)` runs every `notebooks/*.ipynb` with nbclient in a kernel whose
current directory is `workdir` (which holds configs/, data/ and runs/, as after the CPU twins'
commands), fails on the first cell error with the notebook's name and the cell's traceback, and
returns the seconds each notebook took. The notebooks in the repository are only read: executed
copies (with outputs) go to `<workdir>/notebooks_executed/` for inspection.

    from helpers.notebooks import execute_notebooks
    seconds = execute_notebooks(workdir)          # {"01_vision_text_alignment": 6.1, ...}

tests/test_notebooks.py calls it on `$EDGE_GLASS_TWINS_DIR`; the test that trains the twins
(tests/test_experiments.py) can call it on its own working directory.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = REPO / "notebooks"
EXECUTED_DIR = "notebooks_executed"
CELL_TIMEOUT_S = 120
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colours of IPython tracebacks


def notebook_paths() -> list[Path]:
    """The repository's notebooks, in order (01_..., 02_..., ...)."""
    return sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


class NotebookFailed(AssertionError):
    """A notebook cell raised; the message names the notebook and carries the cell's traceback."""


def execute_notebook(path: Path, workdir: Path, *, timeout: int = CELL_TIMEOUT_S, out_dir: Path | None = None,
                     kernel_name: str = "python3", parameters: dict | None = None) -> float:
    """Run one notebook in `workdir`; the seconds it took. Raises `NotebookFailed` on a cell error.

    `parameters` (name -> value) are assigned in a cell inserted after the cell tagged
    `parameters`, as papermill does; names the notebook does not define there are skipped."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    workdir = Path(workdir).resolve()
    nb = nbformat.read(path, as_version=4)
    if parameters:
        at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", []))
        defined = nb.cells[at].source
        lines = [f"{k} = {v!r}" for k, v in parameters.items() if re.search(rf"^{k}\s*=", defined, re.M)]
        if lines:
            nb.cells.insert(at + 1, nbformat.v4.new_code_cell("\n".join(lines)))
    env = {
        **os.environ,
        "EDGE_GLASS_WORKDIR": str(workdir),
        # Offline and on the CPU, as the tests are (conftest.py sets these for this process).
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "TRANSFORMERS_OFFLINE": os.environ.get("TRANSFORMERS_OFFLINE", "1"),
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",  # a frozen-modules warning of debugpy on every start
    }
    client = NotebookClient(
        nb, timeout=timeout, kernel_name=kernel_name, allow_errors=False,
        resources={"metadata": {"path": str(workdir)}},  # the kernel's current directory
    )
    start = time.perf_counter()
    try:
        client.execute(env=env)
    except (CellExecutionError, CellTimeoutError) as e:
        summary = f"{e.ename}: {e.evalue}" if isinstance(e, CellExecutionError) else "a cell timed out"
        detail = ANSI.sub("", str(e))
        raise NotebookFailed(f"{path.name} (run in {workdir}) failed: {summary}\n{detail}") from None
    finally:
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, out_dir / path.name)  # with whatever ran, also after a failure
    return time.perf_counter() - start


def execute_notebooks(workdir: str | os.PathLike, names: Sequence[str] | None = None, *,
                      timeout: int = CELL_TIMEOUT_S, keep_outputs: bool = True,
                      parameters: dict | None = None, workers: int = 1) -> dict[str, float]:
    """Run the repository's notebooks (or those whose names start with one of `names`) in
    `workdir`; {notebook name: seconds}. Raises `NotebookFailed` on the first cell error (of
    the first failing notebook in order). Executed copies go to `<workdir>/notebooks_executed/`
    unless `keep_outputs` is False. `workers` notebooks run at once, each in its own kernel
    process: a kernel spends much of a notebook starting up and waiting on one core, and the
    notebooks only read the working directory, so two share a 2-core box well."""
    workdir = Path(workdir)
    missing = [d for d in ("configs", "data", "runs") if not (workdir / d).is_dir()]
    if missing:
        raise FileNotFoundError(f"{workdir} is no notebook working directory: it lacks {', '.join(missing)}/")
    paths = notebook_paths()
    if names is not None:
        paths = [p for p in paths if any(p.stem.startswith(n) for n in names)]
    if not paths:
        raise FileNotFoundError(f"no notebooks {list(names) if names else ''} in {NOTEBOOK_DIR}")
    out_dir = workdir / EXECUTED_DIR if keep_outputs else None

    def run(p: Path) -> float:
        return execute_notebook(p, workdir, timeout=timeout, out_dir=out_dir, parameters=parameters)

    if workers <= 1:
        return {p.stem: run(p) for p in paths}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        futures = [(p.stem, pool.submit(run, p)) for p in paths]
        return {stem: future.result() for stem, future in futures}
