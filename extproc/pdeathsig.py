"""Exec a command that dies with its parent: `python -m extproc.pdeathsig PARENT_PID CMD...`.

`sessiongate up` starts Envoy through this shim so that even a `kill -9` of sessiongate leaves
no orphan Envoy: the kernel sends the child SIGTERM when its parent dies (PR_SET_PDEATHSIG
survives execve). Doing this in a fresh interpreter avoids `preexec_fn`, which is unsafe in a
process that already runs threads (grpc does).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    parent, command = int(argv[0]), argv[1:]
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return 1
    if os.getppid() != parent:  # the parent died before prctl took effect
        return 1
    os.execv(command[0], command)
    return 1  # pragma: no cover - execv does not return


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
