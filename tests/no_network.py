"""Run scripts with networking blocked for the whole process (used by tests/test_safety.py).

    python -m tests.no_network LOG MODULE ARGS... [--then MODULE ARGS...]...

Every way out to the network (connect, DNS lookup) raises and is appended to LOG, so an attempt that
a library catches and swallows is still seen by the test. The scripts run in order, in this process,
through their own `main`; the exit status is the first non-zero one.
"""
from __future__ import annotations

import importlib
import socket
import sys


def block(log: str) -> None:
    """Make every network connection and name lookup of this process fail, and record it in `log`."""
    def refuse(what):
        def _refused(*args, **kwargs):
            with open(log, "a") as f:
                f.write(f"{what} {args[1:2] if what.startswith('socket.') else args[:1]}\n")
            raise OSError(f"network access blocked by the test ({what})")
        return _refused

    socket.socket.connect = refuse("socket.connect")
    socket.socket.connect_ex = refuse("socket.connect_ex")
    socket.create_connection = refuse("create_connection")
    socket.getaddrinfo = refuse("getaddrinfo")
    socket.gethostbyname = refuse("gethostbyname")


def main(argv: list[str]) -> int:
    log, rest = argv[0], argv[1:]
    block(log)
    from basics import run_main

    runs, current = [], []
    for a in rest:
        if a == "--then":
            runs.append(current)
            current = []
        else:
            current.append(a)
    runs.append(current)
    for module, *args in runs:
        try:
            run_main(importlib.import_module(module).main, args)
        except SystemExit as e:
            if e.code:
                return int(e.code)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
