"""Real servers for the team-setup tests: a PostgreSQL cluster and `mlflow server` (plain or basic-auth).

Everything listens on 127.0.0.1 on a free port and lives in a temporary folder that is removed on teardown,
also when a test fails. A server that does not come up raises `ServerError` with the tail of its log.
The commands are the README's "Tracking server" commands with the same flags (only paths, ports and
passwords differ).

Used as context managers (`with Postgres() as pg:`) or through the module-scoped fixtures at the bottom,
which a test module imports (`from servers import postgres, team_servers, mlflow_server, ...`).
"""

from __future__ import annotations

import base64
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

HOST = "127.0.0.1"
PG_USER = "mlflow"  # the database role the MLflow server connects as
PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"  # Debian's postgresql package: initdb and pg_ctl are not on PATH
PG_OS_USER = "postgres"  # initdb and postgres refuse to run as root: as root, they run as this user


class ServerError(RuntimeError):
    """A server that did not start (or stop); the message ends with its log tail."""


def pg_binary(name: str) -> str:
    """A PostgreSQL program by absolute path: from PATH, else the newest Debian install (PG_BIN_GLOB)."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"{PG_BIN_GLOB}/{name}"), reverse=True)), None)
    if found is None:
        raise ServerError(f"PostgreSQL's {name} is not installed: apt-get install -y postgresql")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def log_tail(path: Path, chars: int = 4000) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as err:
        return f"(no log at {path}: {err})"
    return text[-chars:] if text.strip() else f"(log {path} is empty)"


def listening_addresses(port: int) -> set[str]:
    """The local IPv4/IPv6 addresses a TCP socket listens on at `port` (from /proc/net/tcp*)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                if width == 8:
                    found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
                else:
                    raw = bytes.fromhex(address)
                    found.add(socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))))
    return found


def _clean_env(**extra) -> dict[str, str]:
    """The test process's environment without MLflow/PostgreSQL settings of its own, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PG"))}
    env.update(extra)
    return env


class Postgres:
    """A throwaway PostgreSQL cluster: `initdb` in a temp dir, `pg_ctl start` on 127.0.0.1:<free port>.

    The superuser role is `mlflow` with a random password (scram-sha-256 for every connection, socket
    included); `create_database(name)` runs `createdb` and returns the database's URI without the password
    (libpq reads it from PGPASSWORD, so it never shows on a command line). Stopped with `pg_ctl stop -m fast`.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.password = secrets.token_urlsafe(18)
        self.folder = Path(tempfile.mkdtemp(prefix="cvfp-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        self.started = False
        self.as_root = os.geteuid() == 0
        if self.as_root:
            try:
                account = pwd.getpwnam(PG_OS_USER)
            except KeyError:
                raise ServerError(f"running as root, and there is no '{PG_OS_USER}' user to run PostgreSQL as "
                                  "(initdb refuses root)") from None
            os.chown(self.folder, account.pw_uid, account.pw_gid)
        os.chmod(self.folder, 0o700)

    # the commands (README "Team setup" runs them with the same flags)
    def _as_owner(self, args: list[str]) -> list[str]:
        return ["runuser", "-u", PG_OS_USER, "--", *args] if self.as_root else args

    def _run(self, args: list[str], what: str, timeout: float = 120, env: dict | None = None) -> str:
        args = [pg_binary(args[0]), *args[1:]]
        try:
            done = subprocess.run(self._as_owner(args), cwd=self.folder, capture_output=True, text=True,
                                  timeout=timeout, env=env or _clean_env())
        except subprocess.TimeoutExpired as err:
            raise ServerError(f"PostgreSQL: {what} did not finish in {timeout}s\n{log_tail(self.log)}") from err
        if done.returncode != 0:
            raise ServerError(f"PostgreSQL: {what} failed (exit {done.returncode}): {' '.join(args)}\n"
                              f"{done.stdout[-2000:]}{done.stderr[-2000:]}\n--- server log ---\n{log_tail(self.log)}")
        return done.stdout

    def start(self) -> "Postgres":
        pwfile = self.folder / "pgpass.txt"
        pwfile.write_text(self.password + "\n")
        if self.as_root:
            account = pwd.getpwnam(PG_OS_USER)
            os.chown(pwfile, account.pw_uid, account.pw_gid)
        os.chmod(pwfile, 0o600)
        self._run(["initdb", "-D", str(self.data), "-U", PG_USER, "--auth=scram-sha-256", f"--pwfile={pwfile}",
                   "-E", "UTF8", "--locale=C.UTF-8"], "initdb")
        pwfile.unlink()
        options = f"-c listen_addresses={HOST} -c port={self.port} -c unix_socket_directories={self.folder}"
        self.started = True  # from here on, stop() has something to stop
        self._run(["pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start"],
                  "pg_ctl start")
        return self

    def create_database(self, name: str) -> str:
        self._run(["createdb", "-h", HOST, "-p", str(self.port), "-U", PG_USER, name], f"createdb {name}",
                  env=_clean_env(PGPASSWORD=self.password))
        return self.uri(name)

    def query(self, database: str, sql: str) -> list[tuple]:
        """The rows of one SQL query, straight from the database (not through MLflow)."""
        import psycopg2  # the team extra's driver, as the MLflow server uses it

        connection = psycopg2.connect(host=HOST, port=self.port, user=PG_USER, password=self.password,
                                      dbname=database, connect_timeout=10)
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql)
                return cursor.fetchall()
        finally:
            connection.close()

    def uri(self, database: str) -> str:
        return f"postgresql+psycopg2://{PG_USER}@{HOST}:{self.port}/{database}"

    def stop(self) -> None:
        if self.started:
            self.started = False
            try:
                self._run(["pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop"], "pg_ctl stop")
            finally:
                shutil.rmtree(self.folder, ignore_errors=True)
        else:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "Postgres":
        try:
            return self.start()
        except BaseException:
            try:
                self.stop()
            except ServerError:
                pass  # the start's error is the one to see
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


AUTH_CONFIG = """\
[mlflow]
default_permission = {default_permission}
database_uri = {database_uri}
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


class MlflowServer:
    """`mlflow server` on a PostgreSQL backend store, artifacts proxied to a local folder, on 127.0.0.1.

    With `auth=True` it runs `--app-name basic-auth` with its own config file (MLFLOW_AUTH_CONFIG_PATH: the
    user store is a sqlite file in the temp dir; every signed-in user may log: `default_permission = EDIT`),
    an admin password (MLFLOW_AUTH_ADMIN_PASSWORD) and a CSRF secret (MLFLOW_FLASK_SERVER_SECRET_KEY).
    `kill()` SIGKILLs it (all its workers) mid-test; `start()` again brings it back on the same port,
    backend and artifacts.
    """

    def __init__(self, backend_uri: str, pg_password: str, auth: bool = False, workers: int = 2,
                 start_timeout: float = 120) -> None:
        self.backend_uri = backend_uri
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.folder = Path(tempfile.mkdtemp(prefix="cvfp-mlflow-"))
        self.artifacts = self.folder / "artifacts"
        self.artifacts.mkdir()
        self.log = self.folder / "server.log"
        self.auth = auth
        self.workers = workers
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None
        self.launched = 0.0
        # MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: no job runner (GenAI scorer jobs, which the pipeline never
        # submits); it would add 8 Python processes importing MLflow to every start
        self.env = _clean_env(PGPASSWORD=pg_password, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
                              MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1")
        self.admin = ("admin", secrets.token_urlsafe(18)) if auth else None
        if auth:
            config = self.folder / "basic_auth.ini"
            config.write_text(AUTH_CONFIG.format(default_permission="EDIT",
                                                 database_uri=f"sqlite:///{self.folder / 'basic_auth.db'}"))
            # the CSRF key of the auth app's forms; one per server (all its workers share it)
            self.env.update(MLFLOW_AUTH_CONFIG_PATH=str(config), MLFLOW_AUTH_ADMIN_PASSWORD=self.admin[1],
                            MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(32))

    def command(self) -> list[str]:
        args = ["mlflow", "server", "--backend-store-uri", self.backend_uri,
                "--artifacts-destination", str(self.artifacts), "--host", HOST, "--port", str(self.port),
                "--workers", str(self.workers)]
        return args + (["--app-name", "basic-auth"] if self.auth else [])

    def launch(self) -> "MlflowServer":
        """Start the server process and return at once (see `wait_ready`)."""
        if self.process is not None and self.process.poll() is None:
            raise ServerError(f"mlflow server on {self.url} is already running")
        with open(self.log, "a") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(self.command())}\n")
            log.flush()
            # own session: kill() reaches the uvicorn workers too
            self.process = subprocess.Popen(self.command(), cwd=self.folder, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        self.launched = time.monotonic()
        return self

    def wait_ready(self) -> "MlflowServer":
        """Wait until GET /health answers 200; a server that exits or does not answer raises ServerError."""
        if self.process is None:
            raise ServerError(f"mlflow server on {self.url} was never launched")
        deadline = self.launched + self.start_timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise ServerError(f"mlflow server exited with code {code} before answering {self.url}/health\n"
                                  f"{log_tail(self.log)}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as answer:
                    if answer.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise ServerError(f"mlflow server did not answer {self.url}/health within {self.start_timeout}s\n"
                                  f"{log_tail(self.log)}")
            time.sleep(0.5)

    def start(self) -> "MlflowServer":
        return self.launch().wait_ready()

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the server and every worker: what a crashed or OOM-killed host looks like to a client."""
        if self.process is None:
            return
        self._signal_group(signal.SIGKILL)
        self.process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while listening_addresses(self.port) and time.monotonic() < deadline:  # the workers are gone too
            time.sleep(0.1)

    def terminate(self) -> None:
        """Ask the server to stop (SIGTERM to the server and its workers); `stop` waits for it."""
        if self.process is not None and self.process.poll() is None:
            self._signal_group(signal.SIGTERM)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if self.process is not None:
            self._signal_group(signal.SIGKILL)  # stragglers of the group, if any
            if self.process.poll() is None:
                self.process.wait(timeout=30)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "MlflowServer":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    # the auth REST API
    def request(self, method: str, path: str, body: dict | None = None, user: tuple[str, str] | None = None):
        """(status, parsed JSON or text) of one REST call, as `user` (username, password) or anonymously."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if user is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                status, text = answer.status, answer.read().decode()
        except urllib.error.HTTPError as err:
            status, text = err.code, err.read().decode(errors="replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def create_user(self, username: str) -> tuple[str, str]:
        """A normal (non-admin) user, created by the admin; returns (username, password)."""
        password = secrets.token_urlsafe(18)
        status, answer = self.request("POST", "/api/2.0/mlflow/users/create",
                                      {"username": username, "password": password}, user=self.admin)
        if status != 200:
            raise ServerError(f"creating user {username} failed: {status} {answer}\n{log_tail(self.log)}")
        return username, password


@pytest.fixture(scope="module")
def postgres():
    with Postgres() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def team_servers(postgres):
    """Three servers on their own databases of one cluster, launched together (a start costs tens of seconds
    on a busy 2-core machine; they come up while the first tests work): `plain`, `auth` (basic-auth) and
    `faults` (killed and restarted by a test). The fixtures below wait for the one they hand out."""
    servers = {"plain": MlflowServer(postgres.create_database("team"), postgres.password),
               "auth": MlflowServer(postgres.create_database("team_auth"), postgres.password, auth=True),
               "faults": MlflowServer(postgres.create_database("team_faults"), postgres.password, workers=1)}
    try:
        servers["plain"].start()  # the first test needs it at once; the others start while it works
        servers["auth"].launch()
        servers["faults"].launch()
        yield servers
    finally:
        for server in servers.values():
            server.terminate()
        for server in servers.values():
            server.close()


@pytest.fixture(scope="module")
def mlflow_server(team_servers):
    return team_servers["plain"].wait_ready()


@pytest.fixture(scope="module")
def auth_server(team_servers):
    return team_servers["auth"].wait_ready()


@pytest.fixture(scope="module")
def fault_server(team_servers):
    return team_servers["faults"].wait_ready()
