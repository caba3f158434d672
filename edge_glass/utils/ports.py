"""A free TCP port for a process group's rendezvous.

The launchers' default port, 29500, may be held by another job on the machine (or by a test's
earlier run): a second job on it fails to listen, or hangs in rendezvous. Kept apart from
`distributed.py` so the quickstart driver can use it without importing torch.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on this machine now, for a launcher's `--master_port` or a one-process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
