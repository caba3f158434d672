"""Every file the code and docs mention resolves inside the repository: a doc that points to a
design note, a script or a module that is not here is a dead end for the user who follows it.

A mention is any token that looks like a file name or path with a known extension. It resolves
when it names a tracked file (from the repository root, from the mentioning file's folder, or as
the tail of a tracked path: `training/task.py`), or is one of the files the program itself writes
or reads from elsewhere (ARTIFACTS: run directories, stores, models and data from outside).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from conftest import REPO

MENTION = re.compile(r"(?<![\w/.-])((?:\.\./|\./)?(?:[\w.-]+/)*[\w-][\w.-]*\.(?:md|py|yaml|yml|json|jsonl|sh|ipynb|toml|txt))(?![\w/-])")

ARTIFACTS = {
    # written by the program: run directories, stores, exports, downloads, benchmark output
    "metrics.jsonl", "-samples.jsonl", "config.yaml", "meta.json", "parameters.json", "manifest.json",
    "extraction.json", "quantization.json", "index.json", "dataset.json", "skipped.json", "state.json",
    "shard-NNNNNN.json", "export.json", "args.json", "report.json", "zero_to_fp32.py", "gpu_check.json", "gpu_check.md", "models/local/index.json",
    "out.ipynb", "c.yaml", "align.yaml",
    # files of models and datasets from elsewhere (Hugging Face folders, CTranslate2, annotations)
    "config.json", "generation_config.json", "tokenizer.json", "dataset_dict.json", "annotations.jsonl",
    "coco_val_localized_narratives.jsonl", "_stats.json",
    # launchers' own entry files, named in comments about how they start ranks
    "launch.py", "script.py",
}


def _tracked() -> list[str]:
    return subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()


def test_every_file_mentioned_in_code_and_docs_is_in_the_repository():
    tracked = _tracked()
    sources = [p for p in tracked if p.endswith((".md", ".py", ".ipynb", ".toml", ".yaml", ".json", ".sh", ".txt"))
               and not p.startswith("tests/")]
    assert len(sources) > 100, "the repository's files were found"
    dead = []
    for name in sources:
        path = REPO / name
        for match in MENTION.finditer(path.read_text()):
            ref = match.group(1)
            if ref in ARTIFACTS or Path(ref).name in ARTIFACTS or (REPO / ref).exists() or (path.parent / ref).exists():
                continue
            if any(t == ref or t.endswith("/" + ref) for t in tracked):
                continue
            dead.append(f"{name}: {ref}")
    assert not dead, "mentions of files the repository does not have:\n" + "\n".join(sorted(set(dead)))


def test_the_check_finds_a_dead_mention(tmp_path):
    text = "See PLAN.md and memos/setup.md, like docs/architecture.md."
    found = [m.group(1) for m in MENTION.finditer(text)]
    assert found == ["PLAN.md", "memos/setup.md", "docs/architecture.md"]
    tracked = _tracked()
    missing = [r for r in found if not (REPO / r).exists() and not any(t.endswith("/" + r) for t in tracked)]
    assert missing == ["PLAN.md", "memos/setup.md"]
