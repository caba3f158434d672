"""What stops a training run cleanly: signals, a vanished launcher, a non-finite loss.

Every optimizer step the ranks agree, with one all-reduce, on two things: should they stop (a
rank was signalled, or its launcher is gone), and did any rank see a non-finite loss. Agreeing
matters: a rank that stopped alone would leave the others waiting in DeepSpeed's next collective.
(DeepSpeed's ZeRO optimizers themselves skip a step whose gradients are not finite, so a NaN
loss does not reach the weights; the trainer then stops, or with `train.on_nonfinite: skip`
counts the skipped step and goes on.)

Launchers. `torchrun` forwards SIGTERM to the ranks, but DeepSpeed's runner forwards signals only
for multi-node launches, and a launcher killed with SIGKILL forwards nothing: the ranks would
train on, orphaned, writing checkpoints into a run its user believes stopped. Each rank
therefore watches the launcher processes above it (`LauncherWatch`) and treats their exit as a
SIGTERM: a complete checkpoint at the next step boundary, then exit. If that does not finish
within `grace_s` (a peer rank died too, and a collective waits forever), the rank exits
without one; the half-written checkpoint has no COMPLETE marker and is never loaded.
"""

from __future__ import annotations

import os
import signal
import threading

import torch
import torch.distributed as dist

from edge_glass.utils import distributed as D
from edge_glass.utils.errors import AgreedError

_LAUNCHER_MARKERS = ("torch.distributed.run", "torchrun", "torch.distributed.launch", "deepspeed")


class NonFiniteLoss(AgreedError):
    """The loss became NaN or inf (the run diverged, or its data holds non-finite values)."""


class StopFlag:
    """SIGTERM/SIGINT (and, through `LauncherWatch`, a vanished launcher) ask for a checkpoint and
    a clean exit at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.request(f"signal {signal.Signals(signum).name}")

    def request(self, reason: str) -> None:
        if not self.requested:
            self.requested, self.reason = True, reason

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StepChecks:
    """Per optimizer step: non-finite losses seen on this rank (kept on the device: no sync per
    micro-batch), then one all-reduce agreeing on (stop, non-finite) across ranks."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._bad = torch.zeros((), dtype=torch.float32, device=device)

    def note(self, loss: torch.Tensor) -> torch.Tensor:
        """Mark a non-finite loss; returns the (device) finiteness of this one."""
        finite = torch.isfinite(loss.detach())
        self._bad = torch.maximum(self._bad, (~finite).float())
        return finite

    def agree(self, stop: StopFlag) -> tuple[bool, bool]:
        """(stop, non-finite loss) as every rank sees them; clears the non-finite mark."""
        flags = torch.stack([torch.tensor(float(stop.requested), device=self.device), self._bad])
        if D.world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # nccl needs device tensors
        self._bad = torch.zeros_like(self._bad)
        stopping, bad = (bool(v) for v in flags.tolist())
        if stopping and not stop.requested:
            stop.request("signal or launcher exit on another rank")
        return stopping, bad


def params_finite(module: torch.nn.Module) -> bool:
    """Every trainable parameter (ZeRO-3: this rank's partition) is finite."""
    checks = []
    for p in module.parameters():
        if p.requires_grad:
            t = getattr(p, "ds_tensor", None)
            t = p if t is None or p.numel() else t
            if t.numel():
                checks.append(torch.isfinite(t).all())
    ok = torch.stack(checks).all().float().reshape(1) if checks else torch.ones(1)
    if D.world_size() > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


# --- launcher watch -------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, None when it is gone."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if fields[0] == "Z":  # a zombie has exited; its parent has not reaped it yet
        return None
    return int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def launcher_ancestors() -> list[tuple[int, int]]:
    """(pid, start time) of the launcher processes above this rank, nearest first: torchrun's
    agent, or deepspeed's launch.py and its runner. Empty for a plain `python train.py`."""
    if not D.launched() or not os.path.isdir("/proc"):
        return []
    out = []
    pid = os.getppid()
    while pid > 1:
        st = _stat(pid)
        if st is None or not any(m in _cmdline(pid) for m in _LAUNCHER_MARKERS):
            break
        out.append((pid, st[1]))
        pid = st[0]
    return out


class LauncherWatch:
    """A thread that asks `stop` for a clean exit when a launcher above this rank is gone, and
    ends the process if the exit has not happened `grace_s` later."""

    def __init__(self, stop: StopFlag, period_s: float = 1.0, grace_s: float = 60.0) -> None:
        self.stop, self.period_s, self.grace_s = stop, period_s, grace_s
        self.ancestors = launcher_ancestors()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="launcher-watch", daemon=True)
        if self.ancestors:
            self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(self.period_s):
            gone = [pid for pid, start in self.ancestors if (_stat(pid) or (0, -1))[1] != start]
            if gone:
                self.stop.request(f"launcher process {gone[0]} exited")
                if not self._done.wait(self.grace_s):
                    print(f"launcher process {gone[0]} exited and this rank could not finish a checkpoint in "
                          f"{self.grace_s:.0f} s; exiting without one", flush=True)
                    os._exit(3)
                return

    def close(self) -> None:
        self._done.set()

