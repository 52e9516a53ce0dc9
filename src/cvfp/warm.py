"""Warm stage start: torch and the library imported once, every stage forked from them.

A small stage's own work is a second or less; its start costs more: Python, torch (1.1-1.9 s on
2 cores), the compiler stack that torch's optimizers and initialisers import on first use
(`torch._dynamo`, ~1 s), matplotlib and the library. So `python pipeline/<stage>.py` (what DVC
runs) hands itself to a *warm server* (`python -m cvfp.warm --serve NAME`, a fork server, see
`cvfp.service`) that has imported all of that and nothing else. The server forks a child that:

- takes the stage process's stdin, stdout and stderr (passed over the socket, so DVC, a terminal
  or a test's pipes see its output as the stage's own), its environment, working directory, umask
  and argv (not its resource limits or `-W`/`-X` interpreter options: the server's apply);
- runs `pipeline/<stage>.py` as `__main__`, exactly as Python would have;
- reports its exit code, which the stage process exits with.

The stage process forwards SIGINT, SIGTERM and SIGHUP to the child and waits; if it dies, the
child, which watches the socket, dies too. The first stage after the code changed (or after
`IDLE_S` without a stage) starts the server and waits for its imports, about what a cold start
costs; the next stages start in a fraction of a second.

Same numbers: the server imports modules and does nothing else (no tensor, no random draw, no
thread pool, no CUDA), and the child seeds everything as a new process does (`run_stage`).
`tests/test_warm.py` runs the tiny pipeline warm and cold and compares every output hash.

Not used (the stage starts cold, as before) with `CVFP_WARM_START=0`, off Linux, in the ranks of a
torchrun launch, when the stage's body is not in the script Python was started with (a stage
imported, or run by `runpy` from a driver), or when no server answers within `START_S`.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import importlib.util
import inspect
import io
import json
import os
import runpy
import signal
import socket
import sys
import threading
import traceback
from pathlib import Path
from typing import Callable

from cvfp import service

WARM_ENV = "CVFP_WARM_START"  # "0": every stage imports everything itself
IDLE_ENV = "CVFP_WARM_START_IDLE_S"
IDLE_S = 600.0  # the server exits after this long without a stage
START_S = 60.0  # how long a stage waits for the server's imports before it starts cold
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# what import-time code reads: a server started under other values would not be the process the stage expects
IMPORT_ENV = ("PYTHON", "TORCH", "PYTORCH", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "MPL", "CUDA", "CVFP_KERNEL",
              "HOME", "XDG_", "LD_")
THIRD_PARTY = ("numpy", "torch", "torch._dynamo", "torch.optim", "torch.func", "safetensors.torch", "tokenizers",
               "tqdm", "matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.ticker")
LIBRARY = ("cvfp.stage", "cvfp.params", "cvfp.io", "cvfp.runtime", "cvfp.distributed", "cvfp.model", "cvfp.loop",
           "cvfp.fast", "cvfp.metrics", "cvfp.scan", "cvfp.resume", "cvfp.phase1", "cvfp.phase2", "cvfp.cstar",
           "cvfp.evaluate", "cvfp.baselines", "cvfp.compare", "cvfp.generate", "cvfp.plots", "cvfp.data.corpus",
           "cvfp.data.tokenizer", "cvfp.data.cache", "cvfp.data.carve")
EXIT = b"exit"

SERVED = False  # True in a child of the server: its `run_stage` runs the stage here


def server_name() -> str:
    """The socket name: Python, every library source file, torch's version file, the import-time environment."""
    package = Path(__file__).resolve().parent
    sources = sorted(package.rglob("*.py"))
    spec = importlib.util.find_spec("torch")
    if spec is not None and spec.origin:
        sources.append(Path(spec.origin).parent / "version.py")
    return service.socket_name("warm", [path for path in sources if path.is_file()], IMPORT_ENV)


def delegate(body: Callable) -> int | None:
    """Run this stage in a child of the warm server; its exit code, or None to start cold here.

    Only a body defined in the script Python was started with (`python pipeline/<stage>.py`) is handed over:
    the child reruns that script, so a stage called any other way (imported, `runpy` from a driver) runs here.
    """
    from cvfp.runtime import launched

    if SERVED or launched() or not service.enabled(WARM_ENV) or not _is_the_program(body):
        return None
    name = server_name()
    idle = service.idle_seconds(IDLE_ENV, IDLE_S)
    connection = service.connect(name, [sys.executable, "-m", "cvfp.warm", "--serve", name, "--idle", str(idle)],
                                 service.child_env(), START_S)
    if connection is None:
        return None
    sock = connection.sock
    passed = [fd for fd in (0, 1, 2) if _is_open(fd)]
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    socket.send_fds(sock, [b"\0"], passed)
    umask = os.umask(0o022)
    os.umask(umask)  # read, not changed: the child creates files as this process would
    job = {"fds": passed, "argv": sys.argv, "env": dict(os.environ), "cwd": os.getcwd(), "umask": umask}
    sock.sendall((json.dumps(job) + "\n").encode("utf-8"))
    forwarded: list[int] = []

    def forward(received, frame):
        forwarded.append(received)
        os.kill(connection.pid, received)

    for number in FORWARDED:
        signal.signal(number, forward)
    answer = connection.reader.readline().split()
    sock.close()
    if len(answer) == 2 and answer[0] == EXIT:
        return int(answer[1])
    if forwarded:  # the signal ended the child: end this process by it too, as a cold stage would have ended
        signal.signal(forwarded[-1], signal.SIG_DFL)
        os.kill(os.getpid(), forwarded[-1])
    print(f"error: the stage's process (pid {connection.pid}, forked by the warm server {name}) ended without "
          f"an exit code; see {service.log_path(name)}", file=sys.stderr)
    return 1


def _is_the_program(body: Callable) -> bool:
    if getattr(body, "__module__", None) != "__main__" or not sys.argv or not sys.argv[0]:
        return False
    frame = sys._getframe()
    while frame is not None:  # runpy.run_path sets argv[0] to the script it runs: a driver is not the program
        if frame.f_globals.get("__name__") == "runpy":
            return False
        frame = frame.f_back
    try:
        return Path(sys.argv[0]).resolve() == Path(inspect.getfile(body)).resolve()
    except (TypeError, OSError):
        return False


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def preload() -> None:
    """Import torch, the compiler stack it pulls in on first use, matplotlib and the library: nothing runs."""
    for module in (*THIRD_PARTY, *LIBRARY):
        importlib.import_module(module)


def run_child(conn: socket.socket) -> None:
    """In a forked child: become the stage process described on `conn`, run its script, report, exit."""
    global SERVED
    SERVED = True
    code = 1
    try:
        _, fds, _, _ = socket.recv_fds(conn, 1, 3)
        reader = conn.makefile("rb")
        line = reader.readline()
        if not line:
            os._exit(0)  # the stage process went away before saying what to run
        job = json.loads(line)
        for target, fd in zip(job["fds"], fds):
            os.dup2(fd, target)
            os.close(fd)
        _reopen_stdio(job["env"])
        os.environ.clear()
        os.environ.update(job["env"])
        os.chdir(job["cwd"])
        os.umask(job["umask"])
        sys.argv = list(job["argv"])
        sys.path[0] = str(Path(sys.argv[0]).resolve().parent)  # as `python <script>` sets it
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for number in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(number, signal.SIG_DFL)
        threading.Thread(target=_die_with, args=(conn,), name="cvfp-warm-watch", daemon=True).start()
        code = _run_script(sys.argv[0])
        atexit._run_exitfuncs()  # what the interpreter would do at exit (tempfile cleanup, torch's hooks)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        try:
            conn.sendall(EXIT + f" {code}\n".encode())
        except OSError:
            pass
        os._exit(code)


def _run_script(path: str) -> int:
    try:
        runpy.run_path(path, run_name="__main__")
        return 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return 128 + signal.SIGINT
    except BaseException:
        sys.excepthook(*sys.exc_info())
        return 1


def _reopen_stdio(env: dict[str, str]) -> None:
    """sys.stdin/stdout/stderr on the stage process's descriptors, buffered as Python buffers them."""
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    encoding = (env.get("PYTHONIOENCODING") or "utf-8").split(":")[0]

    def stream(fd: int, mode: str, errors: str, line: bool) -> io.TextIOWrapper:
        raw = io.FileIO(fd, mode, closefd=False)
        buffered = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
        return io.TextIOWrapper(buffered, encoding=encoding, errors=errors, line_buffering=line,
                                write_through=unbuffered and mode == "w")

    sys.stdin = sys.__stdin__ = stream(0, "r", "strict", False)
    sys.stdout = sys.__stdout__ = stream(1, "w", "strict", os.isatty(1))
    sys.stderr = sys.__stderr__ = stream(2, "w", "backslashreplace", True)


def _die_with(conn: socket.socket) -> None:
    """The stage process closed its end without waiting for the exit code: it was killed; so is this child."""
    try:
        conn.recv(1)
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cvfp.warm")
    parser.add_argument("--serve", metavar="NAME", required=True, help="the local socket name to serve on")
    parser.add_argument("--idle", type=float, required=True, help="seconds without a stage before the server exits")
    args = parser.parse_args(argv)
    if not args.idle > 0:
        parser.error(f"--idle must be a positive number of seconds, got {args.idle}")
    conn = service.serve(args.serve, args.idle, preload)
    if conn is None:
        return 0  # idle, or another server holds the name
    run_child(conn)  # never returns
    return 1


if __name__ == "__main__":
    from cvfp.warm import main as library_main  # run in the library's copy of this module: its SERVED is the one
    raise SystemExit(library_main())            # `run_stage` reads
