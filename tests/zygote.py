"""A fork server for the tests' script launches: `python -m <module> <args>`, minus the imports.

A script launch spends ~5 s of its 8-10 s importing torch and diffusers (which pulls in peft,
transformers and scipy) before it does any work, and the tests launch scripts ~50 times. This
server imports those libraries once; each launch is then a fork of it that runs the module as
`__main__` (runpy, as `python -m` does) with its own argv, environment, working directory,
stdout and stderr, and exits with the status the interpreter would give. Every launch is still a
process of its own: its globals, threads, RNGs and exit are separate from the tests' and from the
other launches'. Nothing here runs a tensor operation before forking, so no thread pool (OpenMP)
exists yet to be lost in the child.

Each launch leads a process group of its own, so that killing it (os.killpg) leaves the
server and the tests alone. Protocol, one JSON object per line: request {module, args, env, cwd, stdout,
stderr (a path; the stdout path itself for one file for both), dump_after (seconds, optional: then
the launch prints its threads' stacks to stderr, once)} on stdin;
the server answers {"pid": ...} when the child has started and {"returncode": ...} when it has
exited (negative: killed by that signal, like subprocess).

    python -m tests.zygote      # started by tests.conftest.run_script; ends at EOF on stdin
"""
from __future__ import annotations

import atexit
import contextlib
import faulthandler
import importlib
import json
import os
import runpy
import sys
import traceback

PRELOAD = ("torch", "diffusers", "rl.trainer", "reward.artifact", "reward.build", "evaluation.report", "utils",
           "matplotlib.pyplot", "sklearn.manifold", "ot")
"""What every script imports anyway, and what the evaluation imports where it is used (plots, t-SNE, OT;
~1.2 s); the script modules themselves are left to runpy, which warns when the module it runs is already
imported."""


def exit_code(code) -> int:
    """The status the interpreter gives for SystemExit(code): None -> 0, an int -> itself, anything else
    is printed to stderr -> 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def child(request: dict) -> None:
    """Run the requested module as __main__ in this (forked) process, then exit; never returns."""
    code = 1
    try:
        os.setpgid(0, 0)  # a process group of its own (the server sets it too, before it answers with the pid)
        os.dup2(os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)
        if request["stderr"] == request["stdout"]:  # one file for both, as stderr=subprocess.STDOUT
            os.dup2(1, 2)
        else:
            os.dup2(os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = [request["module"], *request["args"]]
        if request.get("dump_after"):  # a launch still running then prints every thread's stack: where it hangs
            faulthandler.dump_traceback_later(request["dump_after"], exit=False)
        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = exit_code(e.code)
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()  # what the interpreter runs at exit (os._exit below skips it)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def serve() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    channel = os.fdopen(os.dup(1), "w", buffering=1)  # answers; fd 1 itself is the children's stdout
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            channel.close()
            child(request)
        with contextlib.suppress(OSError):  # set by the child already, or the child has exited
            os.setpgid(pid, pid)
        channel.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        channel.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")


if __name__ == "__main__":
    serve()
