"""Who holds a lease on a claimed row (a delivery being sent, a webhook being posted), and
whether that holder is a process on this machine that has died.

Campaign senders and webhook dispatchers share this: a dead local holder's claims can be taken
over at once instead of waiting for the lease to run out."""

from __future__ import annotations

import os
import secrets
import socket


def make_owner() -> str:
    """Machine, process and a random part (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def is_dead_local_owner(owner: str) -> bool:
    """True only when the owner is a process on this machine that no longer exists."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False
