"""Fork servers: a process that imports something slow once and forks a fresh child per client.

Two servers use this: the tracking service (`cvfp.tracking_writer --serve`: MLflow, one writer per
stage) and the warm stage start (`cvfp.warm`: torch and the library, one stage per `python
pipeline/<stage>.py`). Both follow the same rules:

- **Name.** A server listens on a Linux abstract socket (no file, gone with the process) whose
  name hashes what the child would run: the Python executable, the source files it loaded, the
  environment read at import time, the user. Edit a source file and the next client gets a new
  server; the old one idles out.
- **Who.** Only the same user: both ends check the peer's uid (SO_PEERCRED), since abstract
  names are visible to every user of the machine.
- **Start.** A client that finds no server starts one, detached (its own session, stdio to
  /dev/null and a log file in the temp folder), and waits for it; two clients racing both
  start one, the second's bind fails and it exits 0.
- **Ready.** The server accepts, forks, and the child's first line is `ready <pid>`; a client
  that connects while an idle server is closing gets no such line and connects again.
- **Idle.** The server exits after `idle_s` seconds without a client. Nothing is opened before
  the fork (no store, no CUDA, no thread pool): each child starts as clean as a new process.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable

READY = b"ready"


def enabled(switch: str) -> bool:
    """A server may be used: Linux, and the environment variable `switch` is not "0"."""
    return sys.platform.startswith("linux") and os.environ.get(switch, "1") != "0"


def socket_name(kind: str, sources: Iterable[Path], env_prefixes: tuple[str, ...] = ()) -> str:
    """`cvfp-<kind>-<uid>-<hash>`: the hash covers Python, the sources' bytes and paths, and the environment
    variables whose names start with one of `env_prefixes` (those that code reads when it is imported)."""
    digest = hashlib.sha256(f"{sys.executable}\0{os.getuid()}".encode())
    for path in sources:
        digest.update(f"\0{path}\0".encode())
        digest.update(path.read_bytes())
    for name in sorted(os.environ):
        if name.startswith(env_prefixes):
            digest.update(f"\0{name}={os.environ[name]}".encode())
    return f"cvfp-{kind}-{os.getuid()}-{digest.hexdigest()[:20]}"


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a local socket (Linux's SO_PEERCRED)."""
    _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid


def idle_seconds(variable: str, default: float) -> float:
    """The server's idle time from `variable`, or `default` (with a warning naming the bad value)."""
    text = os.environ.get(variable)
    if text is None:
        return default
    try:
        value = float(text)
        if value > 0:
            return value
    except ValueError:
        pass
    warnings.warn(f"{variable}={text!r} is not a positive number of seconds; using {default}", stacklevel=3)
    return default


class Connection:
    """A client's end: the socket, a buffered reader on it, and the pid of the child serving it."""

    def __init__(self, sock: socket.socket, reader, pid: int):
        self.sock, self.reader, self.pid = sock, reader, pid


def connect(name: str, command: list[str], env: dict[str, str], start_s: float) -> Connection | None:
    """A child of the server `name` (started with `command` if none listens), or None if there is none within
    `start_s` seconds (the caller then does the work itself)."""
    started: subprocess.Popen | None = None
    deadline = time.monotonic() + start_s
    while time.monotonic() < deadline:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect("\0" + name)
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
            if started is None:
                started = start(name, command, env)
                if started is None:
                    return None
            elif started.poll() not in (None, 0):
                return None  # it failed (its log says why); one that lost a start race exits 0
            time.sleep(0.02)
            continue
        except OSError:
            sock.close()
            return None
        if peer_uid(sock) != os.getuid():
            sock.close()
            return None
        sock.settimeout(max(deadline - time.monotonic(), 0.1))
        reader = sock.makefile("rb")
        try:
            first = reader.readline().split()
        except OSError:
            first = []
        if len(first) == 2 and first[0] == READY:
            sock.settimeout(None)
            return Connection(sock, reader, int(first[1]))
        sock.close()  # the server was closing (idle) as we connected: connect again
    return None


def log_path(name: str) -> Path:
    return Path(tempfile.gettempdir()) / f"{name}.log"


def start(name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen | None:
    """Start a server detached from this process: its own session, so a Ctrl-C to this one leaves it be."""
    try:
        with open(log_path(name), "ab") as log:
            return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                    cwd="/", env=env, start_new_session=True)
    except OSError:
        return None


def serve(name: str, idle_s: float, preload: Callable[[], None]) -> socket.socket | None:
    """Run the server `name`: import what `preload` imports, then fork a child per client.

    Returns None in the server (after `idle_s` seconds without a client, or at once if another server holds
    the name) and the client's connected socket in each child, which has said `ready <pid>` on it.
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind("\0" + name)
    except OSError:
        return None
    listener.listen(64)  # clients that connect while `preload` runs wait here
    preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    listener.settimeout(idle_s)
    while True:
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            listener.close()
            return None
        if peer_uid(conn) != os.getuid():
            conn.close()
            continue
        if os.fork() == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            conn.settimeout(None)
            conn.sendall(READY + f" {os.getpid()}\n".encode())
            return conn
        conn.close()


SERVER_MODULES = {"cvfp.warm": "warm stage server", "cvfp.tracking_writer": "tracking service"}


def servers() -> list[tuple[int, str, str]]:
    """This user's running servers: (pid, what it is, its socket name), read from /proc."""
    found = []
    for entry in sorted(Path("/proc").iterdir(), key=lambda path: path.name):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            command = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "--serve" in command and command.index("--serve") + 1 < len(command):
            module = next((word for word in command if word in SERVER_MODULES), None)
            if module is not None:
                found.append((int(entry.name), SERVER_MODULES[module], command[command.index("--serve") + 1]))
    return found


def stop(pids: Iterable[int]) -> int:
    """SIGTERM each server in `pids`; stages it forked go on (they are processes of their own). How many stopped."""
    stopped = 0
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            stopped += 1
        except OSError:
            pass
    return stopped


def child_env() -> dict[str, str]:
    """A server's environment: this process's, with cvfp importable from where this process imported it."""
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [env.get("PYTHONPATH")])])
    return env
