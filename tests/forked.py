"""``python -m cnnlab.<command>`` run as a process forked from one that has imported cnnlab
already, as multiprocessing's forkserver does: the command runs for real in a process of its
own (its argv, environment, folder, standard streams, exit status and atexit handlers), but
without the ~10 s that starting Python and importing torch, Lightning and MLflow take on a
small CPU, which most of the suite's commands would spend again and again. Tests that are
about the start itself (``make train``, the console scripts, completion) start a fresh
interpreter instead.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# What the server imports before any fork: the commands a fork serves (a package's
# __main__ is what ``python -m package`` runs).
PRELOAD = ("cnnlab.train", "cnnlab.eval", "cnnlab.summary", "cnnlab.report.__main__")
MODULES = tuple(name.removesuffix(".__main__") for name in PRELOAD)

# The server: reads one request a line ({argv, cwd, env, out, err}), forks, answers with the
# child's pid, waits for it and answers with its exit status. The child never returns into
# the loop: it ends as ``python -m`` ends (SystemExit through the interpreter's shutdown).
SERVER = r"""
import importlib, json, os, runpy, signal, sys, traceback
requests, answers = os.fdopen(int(sys.argv[1]), "r"), os.fdopen(int(sys.argv[2]), "w")
for name in sys.argv[3:]:
    importlib.import_module(name)
answers.write("ready\n"); answers.flush()
for line in requests:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        requests.close(); answers.close()
        os.setpgid(0, 0)
        os.chdir(request["cwd"])
        os.environ.clear(); os.environ.update(request["env"])
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["out"], os.O_WRONLY),
                                (2, request["err"], os.O_WRONLY)):
            opened = os.open(path, flags)
            os.dup2(opened, fd)
            os.close(opened)
        module, *args = request["argv"]
        sys.argv = [module, *args]
        # As under python -m, the module to run is not imported yet (else runpy warns)
        sys.modules.pop(module, None); sys.modules.pop(f"{module}.__main__", None)
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit:
            raise
        except BaseException as error:  # as the interpreter ends on an uncaught exception
            traceback.print_exc()
            if isinstance(error, KeyboardInterrupt):  # killed by the SIGINT, as Python is
                sys.stderr.flush()
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGINT)
            sys.exit(1)
        sys.exit(0)
    answers.write(f"{pid}\n"); answers.flush()
    _, status = os.waitpid(pid, 0)
    answers.write(f"{os.waitstatus_to_exitcode(status)}\n"); answers.flush()
"""


class ForkServer:
    """One server per test process, started at its first command."""

    def __init__(self) -> None:
        request_read, self._requests = os.pipe()
        self._answers, answer_write = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(request_read), str(answer_write), *PRELOAD],
            pass_fds=(request_read, answer_write),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        os.close(request_read)
        os.close(answer_write)
        self._buffer = b""
        ready = self._answer(timeout=600)
        if ready != "ready":
            raise RuntimeError(f"the fork server did not start: {ready!r}")

    def run(
        self, argv: list[str], cwd: Path, env: dict[str, str], timeout: float
    ) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="cnnlab-fork-") as folder:
            out, err = Path(folder, "stdout"), Path(folder, "stderr")
            out.touch()
            err.touch()
            request = {"argv": argv, "cwd": str(cwd), "env": env, "out": str(out), "err": str(err)}
            os.write(self._requests, (json.dumps(request) + "\n").encode())
            pid = int(self._answer(timeout=60))
            try:
                status = int(self._answer(timeout=timeout))
            except TimeoutError as error:
                os.killpg(pid, signal.SIGKILL)
                self._answer(timeout=60)
                output = (out.read_text(), err.read_text())
                raise subprocess.TimeoutExpired(argv, timeout, *output) from error
            return subprocess.CompletedProcess(argv, status, out.read_text(), err.read_text())

    def _answer(self, timeout: float) -> str:
        while b"\n" not in self._buffer:
            readable, _, _ = select.select([self._answers], [], [], timeout)
            if not readable:
                raise TimeoutError
            chunk = os.read(self._answers, 4096)
            if not chunk:
                return ""
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def stop(self) -> None:
        os.close(self._requests)
        self.process.wait(timeout=60)


_server: ForkServer | None = None


def run_module(
    argv: list[str], cwd: Path, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess:
    """``python -m argv[0] argv[1:]`` in a forked process, as :func:`subprocess.run` with
    ``capture_output=True, text=True`` reports it."""
    global _server
    if _server is None or _server.process.poll() is not None:
        _server = ForkServer()
    return _server.run(argv, cwd, env, timeout)


def stop() -> None:
    if _server is not None and _server.process.poll() is None:
        _server.stop()
