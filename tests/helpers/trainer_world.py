"""Shared setup for the trainer tests (test_trainer.py, test_trainer_resume.py, test_trainer_topology.py).

Every run here trains the align stage on `feature_world`'s tiny store (128 train samples) with
tiny adapters, fp32, on CPU, launched as a user launches it: `python scripts/train.py` or
`python -m torch.distributed.run --standalone --nproc_per_node 2 scripts/train.py`.

A "place" is a working directory. The config's `experiment.output_dir` is the default, relative
`runs`, so a run lives in `<place>/runs/<name>` and copying `runs/` to another place gives a run
that resumes there with an unchanged config (an absolute output_dir would be a config change,
which a resume refuses).

`trainer_world(tmp_path_factory)` makes, once per pytest process, the uninterrupted 2-rank
ZeRO-2 run every resume is compared against: 12 steps (1.5 epochs of 8 steps per rank), a
checkpoint and an evaluation every 3 steps (so checkpoints 3, 6 and 9 are mid-epoch), all kept,
with dropout in the adapters (so the per-rank RNG streams matter too).

Process trees: torchrun (torch >= 2.x elastic) starts each rank in a session of its own, so
killing the launcher's process group leaves the ranks running. `kill_tree` signals the launcher
and every descendant found through /proc.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pytest

from helpers.feature_world import World, feature_world

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "scripts" / "train.py"
HOOKED_TRAIN = REPO / "tests" / "helpers" / "trainer_train_hooks.py"
ZERO1 = REPO / "ds_configs" / "zero1.json"
ZERO2 = REPO / "ds_configs" / "zero2.json"
ZERO3 = REPO / "ds_configs" / "zero3.json"

NAME = "ref"
MAX_STEPS = 12
INTERVAL = 3  # save and eval
STEPS_PER_EPOCH_2_RANKS = 8  # 128 samples / (2 ranks x micro batch 8)
TIMEOUT = 300  # the first DeepSpeed start on a fresh machine JIT-builds the shm op (~45 s)
MRL_DIMS = (8, 16)
SHARED_DIM = 32
LR = 1e-3

OVERRIDES = [
    f"experiment.name={NAME}",
    "data.micro_batch_size=8",
    "data.eval_batch_size=16",
    "data.read_block_size=8",
    f"train.max_steps={MAX_STEPS}",
    "train.log_interval=1",
    f"train.eval_interval={INTERVAL}",
    f"train.save_interval={INTERVAL}",
    "train.keep_last=10",
    "train.precision=fp32",
    f"train.deepspeed={ZERO2}",
    f"optim.lr={LR}",
    "optim.warmup_steps=2",
    f"model.shared_dim={SHARED_DIM}",
    f"model.mrl_dims=[{', '.join(map(str, MRL_DIMS))}]",
    "model.adapters.vision.hidden_dim=32",
    "model.adapters.audio.hidden_dim=32",
    "model.adapters.text.hidden_dim=32",
    # dropout draws from each rank's RNG, so an exact resume also needs the RNG state restored
    "model.adapters.vision.dropout=0.1",
    "model.adapters.audio.dropout=0.1",
    "model.adapters.text.dropout=0.1",
]

_LAUNCHER_VARS = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
    "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
)


# --- the world and the reference run --------------------------------------------------------------


@dataclass(frozen=True)
class TrainerWorld:
    world: World
    root: Path
    config: Path
    """Config YAML of every run here; runs differ by --set/--deepspeed/--resume and their place."""
    reference: Path
    """The place of the uninterrupted reference run (its run is `reference / runs / ref`)."""

    def run_dir(self, place: Path, name: str = NAME) -> Path:
        return place / "runs" / name

    @property
    def reference_run(self) -> Path:
        return self.run_dir(self.reference)


_TW: TrainerWorld | None = None


def trainer_world(tmp_path_factory: pytest.TempPathFactory) -> TrainerWorld:
    """The feature world, the trainer config and the reference run, built once per process."""
    global _TW
    if _TW is None:
        world = feature_world(tmp_path_factory)
        root = tmp_path_factory.mktemp("trainer-world")
        config = world.write_config(root / "config.yaml", world.store, OVERRIDES)
        reference = root / "reference"
        reference.mkdir()
        result = train(reference, config, nproc=2)
        result.check()
        _TW = TrainerWorld(world, root, config, reference)
    return _TW


def copy_run(tw: TrainerWorld, place: Path, keep_steps: Sequence[int] | None = None) -> Path:
    """A copy of the reference run in `place`; with `keep_steps`, the other checkpoints are
    deleted, leaving what a run interrupted after the newest of them left on disk (its
    metrics.jsonl still has the later lines, as a crashed run's has)."""
    place.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tw.reference / "runs", place / "runs")
    run = tw.run_dir(place)
    if keep_steps is not None:
        for ckpt in (run / "checkpoints").glob("step*"):
            if int(ckpt.name[4:]) not in keep_steps:
                shutil.rmtree(ckpt)
    return run


# --- launching ------------------------------------------------------------------------------------


def env(**extra: str) -> dict[str, str]:
    """This environment without a launcher's variables, CPU, offline, one thread per rank."""
    out = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    out.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    out.update(extra)
    return out


def train_cmd(config: Path, *args: str, nproc: int = 1, script: Path = TRAIN) -> list[str]:
    """`python scripts/train.py ...` for one process, torchrun --standalone for more."""
    if nproc == 1:
        return [sys.executable, str(script), "--config", str(config), *args]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        str(script), "--config", str(config), *args,
    ]


@dataclass
class Result:
    cmd: list[str]
    returncode: int
    stdout: str
    stderr: str

    def check(self, code: int = 0) -> "Result":
        assert self.returncode == code, f"{self}"
        return self

    def __str__(self) -> str:
        return (f"{' '.join(self.cmd)}\nexit {self.returncode}\n--- stdout:\n{self.stdout[-6000:]}"
                f"\n--- stderr:\n{self.stderr[-6000:]}")


class Launched:
    """A started command with its output in files (a pipe nobody reads can fill and block it)."""

    _count = 0

    def __init__(self, cmd: Sequence[str], cwd: Path, environ: dict[str, str] | None = None) -> None:
        Launched._count += 1
        stem = Path(cwd) / f".launch-{os.getpid()}-{Launched._count}"
        self.cmd = list(cmd)
        self.out_path, self.err_path = stem.with_suffix(".out"), stem.with_suffix(".err")
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                self.cmd, cwd=cwd, env=environ or env(), stdout=out, stderr=err, start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float = TIMEOUT) -> Result:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.proc.pid)
            self.proc.wait()
            pytest.fail(f"timed out after {timeout}s: {self.result()}")
        return self.result()

    def result(self) -> Result:
        return Result(self.cmd, self.proc.returncode if self.proc.returncode is not None else -999,
                      self.out_path.read_text(errors="replace"), self.err_path.read_text(errors="replace"))

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") + self.err_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        kill_tree(self.proc.pid, sig)

    def __enter__(self) -> "Launched":
        return self

    def __exit__(self, *exc) -> None:
        # Whatever happened in the test, no rank outlives it.
        if self.proc.poll() is None or descendants(self.proc.pid):
            kill_tree(self.proc.pid)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass


def train(place: Path, config: Path, *args: str, nproc: int = 1, script: Path = TRAIN, timeout: float = TIMEOUT,
          environ: dict[str, str] | None = None) -> Result:
    """Run training in `place` to the end (no `.check()`: callers assert the exit code)."""
    place.mkdir(parents=True, exist_ok=True)
    with Launched(train_cmd(config, *args, nproc=nproc, script=script), place, environ) as launched:
        return launched.wait(timeout)


def run_module(place: Path, module: str, *args: str, timeout: float = TIMEOUT) -> Result:
    with Launched([sys.executable, "-m", module, *args], place) as launched:
        return launched.wait(timeout)


def run_script(place: Path, script: str, *args: str, timeout: float = TIMEOUT) -> Result:
    with Launched([sys.executable, str(REPO / "scripts" / script), *args], place) as launched:
        return launched.wait(timeout)


# --- process trees ----------------------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may contain spaces and parentheses
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Signal `pid` and all its descendants (the launcher and every rank) at once."""
    pids = descendants(pid) + [pid]
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    return pids


def rank_pid(launcher_pid: int, rank: int) -> int:
    """The pid of one rank under torchrun (read from each child's RANK variable)."""
    for p in descendants(launcher_pid):
        try:
            raw = Path(f"/proc/{p}/environ").read_bytes()
        except OSError:
            continue
        environ = dict(item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
        if environ.get(b"RANK") == str(rank).encode() and b"TORCHELASTIC_RUN_ID" in environ:
            return p
    raise AssertionError(f"no rank {rank} under {launcher_pid}")


def wait_until(predicate: Callable[[], bool], launched: Launched, what: str, timeout: float = TIMEOUT,
               period: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if launched.poll() is not None:
            pytest.fail(f"the run ended before {what}: {launched.result()}")
        if time.monotonic() > deadline:
            launched.kill()
            pytest.fail(f"timed out waiting for {what}: {launched.result()}")
        time.sleep(period)


# --- reading runs -----------------------------------------------------------------------------------


def metrics(run: Path) -> list[dict]:
    """metrics.jsonl; a line being written right now (no newline yet) is left out."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().split("\n")[:-1]:
        if line.strip():
            out.append(json.loads(line))
    return out


def train_records(run: Path) -> list[dict]:
    return [r for r in metrics(run) if r["kind"] == "train"]


def eval_records(run: Path) -> list[dict]:
    return [r for r in metrics(run) if r["kind"] == "eval"]


def logged_steps(run: Path) -> list[int]:
    return [r["step"] for r in train_records(run)]


def last_logged_step(run: Path) -> int:
    steps = logged_steps(run)
    return steps[-1] if steps else 0


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in train_records(run)}


def complete_steps(run: Path) -> list[int]:
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name[4:]) for p in root.glob("step*") if (p / "COMPLETE").is_file())


def checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step{step}"


def meta(ckpt: Path) -> dict:
    return json.loads((ckpt / "meta.json").read_text())


def assert_each_step_once(run: Path, last: int, eval_every: int | None = INTERVAL) -> None:
    assert logged_steps(run) == list(range(1, last + 1)), f"train steps in {run}/metrics.jsonl: {logged_steps(run)}"
    if eval_every:
        want = sorted(set(range(eval_every, last + 1, eval_every)) | {last})
        assert [r["step"] for r in eval_records(run)] == want


def assert_same_training(run: Path, reference: Path, steps: Sequence[int]) -> None:
    """Bit-identical per-step records (loss, lr, epoch, logit scale) and evaluations."""
    mine = {r["step"]: r for r in train_records(run)}
    ref = {r["step"]: r for r in train_records(reference)}
    for s in steps:
        for key in ("loss", "lr", "epoch", "logit_scale"):
            assert mine[s][key] == ref[s][key], f"step {s} {key}: {mine[s][key]!r} != reference {ref[s][key]!r}"
    ref_eval = {r["step"]: r for r in eval_records(reference)}
    for r in eval_records(run):
        if r["step"] in steps:
            assert r == ref_eval[r["step"]], f"evaluation at step {r['step']} differs from the reference"


def assert_same_weights(a: Path, b: Path) -> None:
    """Consolidated fp32 weights (DeepSpeed's zero_to_fp32) of two checkpoints are equal."""
    import torch

    from edge_glass.training.run_loading import fp32_state_dict

    sa, sb = fp32_state_dict(a), fp32_state_dict(b)
    assert sorted(sa) == sorted(sb)
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"{a} and {b} differ in {different}"


def assert_finite_losses(run: Path) -> None:
    bad = {s: v for s, v in losses(run).items() if not math.isfinite(v)}
    assert not bad, f"non-finite losses {bad}"


def error_lines(result: Result) -> list[str]:
    """The `error: ...` lines a script prints for a UserError (one per process)."""
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def assert_one_line_error(result: Result, *needles: str) -> str:
    """Exit 2, exactly one `error:` line and no traceback; returns the line."""
    assert result.returncode == 2, f"{result}"
    lines = error_lines(result)
    assert len(lines) == 1, f"{result}"
    assert "Traceback" not in result.stderr, f"{result}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]
