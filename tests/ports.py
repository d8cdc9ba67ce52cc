"""Ports for the tests' multi-process runs: torchrun's store at P and JAX's coordinator at P + 1.

JAX's coordination service binds P + 1 on every interface ('[::]'); a port that is merely free on
127.0.0.1 (what binding to port 0 there finds) can still be taken there, and the run then dies at
start-up. Both ports are checked the way their servers bind them.
"""

from __future__ import annotations

import socket


def _bindable(port: int) -> bool:
    for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::")):
        try:
            with socket.socket(family) as probe:
                probe.bind((address, port))
        except OSError as error:
            if family == socket.AF_INET6 and error.errno in (97, 99):  # no IPv6 on this machine
                continue
            return False
    return True


def free_port_pair() -> int:
    """A port P with P and P + 1 free (torch's store and JAX's coordinator)."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
        if port < 65535 and _bindable(port) and _bindable(port + 1):
            return port
    raise RuntimeError("found no two consecutive free ports")
