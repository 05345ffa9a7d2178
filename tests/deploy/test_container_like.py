"""The image without a Docker engine: the project's wheel is built and installed into a fresh
virtual environment by the Dockerfile's own builder commands, then the service runs with the
Dockerfile's ENV, USER, WORKDIR and ENTRYPOINT + CMD (read from the Dockerfile, so this test
and the image cannot drift apart) as an unprivileged user. It answers its probes, takes
SIGTERM under load and exits 0, and every request it accepted is still there after a restart
and completes. The same environment runs `enginedge worker --type data-processing`.

Paths of the image are mapped into a scratch directory: /opt/venv, /wheels, the builder's
WORKDIR, the runtime WORKDIR and ENGINEDGE_DATA_DIR. PORT is a free port (3000 may be taken
here) and API_KEYS is set, as a deployment sets it. tini runs as in the image when it is
installed here (`make container-tools`); without it the test runs CMD alone.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from enginedge.entrypoints.processes import stop_process
from tests.support.servers import free_port, kafka_broker

ROOT = Path(__file__).parents[2]
KEY = "container-test-key-0123456789"
# The base image's PATH and locale (python:3.11-slim).
BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
SQL = {
    "sql": "SELECT count(*) AS n FROM range(300000) t(i) WHERE i % 7 = 3",
    "tables": {"t": [{"a": 1}]},
}
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


# --- the Dockerfile, read as Docker reads it (the subset it uses) ------------------------


@dataclass
class Stage:
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"no {keyword} in stage {self.name}"
        return found[-1]


def parse_dockerfile(text: str) -> list[Stage]:
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            name = args.split(" AS ")[-1].strip() if " AS " in args else str(len(stages))
            stages.append(Stage(name))
        elif stages:
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


def expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), value)


def env_of(stage: Stage, base: dict[str, str]) -> dict[str, str]:
    env = dict(base)
    for args in stage.all("ENV"):
        words = shlex.split(args)
        if "=" not in words[0]:  # the legacy form: ENV KEY VALUE
            env[words[0]] = expand(" ".join(words[1:]), env)
            continue
        updates = {}
        for word in words:
            key, _, value = word.partition("=")
            updates[key] = expand(value, env)
        env.update(updates)
    return env


@dataclass
class Image:
    """What the Dockerfile's production stage says, mapped into a scratch directory."""

    root: Path
    venv: Path
    workdir: Path
    data_dir: Path
    env: dict[str, str]
    command: list[str]
    uid: int
    gid: int
    init: str | None  # the ENTRYPOINT's init, when it is installed here


def map_path(value: str, mapping: dict[str, Path]) -> str:
    for image_path, local in sorted(mapping.items(), key=lambda kv: -len(kv[0])):
        value = value.replace(image_path, str(local))
    return value


def drop_to(uid: int, gid: int) -> list[str]:
    """The command prefix that runs a program as uid/gid (nothing unless we are root).

    The program is exec'd by a shell that already runs unprivileged: setpriv's own exec
    still looks the program up with root's capabilities, so a path the user may not reach
    would seem to work."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to drop root"
    return [
        setpriv,
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        "/bin/sh",
        "-c",
        'exec "$@"',
        "sh",
    ]


def base_python(uid: int, gid: int) -> str:
    """A Python 3.11+ with venv that uid/gid can run (this one may live in a private home,
    e.g. under /root)."""
    candidates = [
        sys._base_executable,
        sys.executable,
        "/usr/local/bin/python3",
        "/usr/bin/python3",
    ]
    check = "import sys, venv, ensurepip; assert sys.version_info >= (3, 11)"
    for candidate in dict.fromkeys(candidates):
        if not os.path.exists(candidate):
            continue
        tried = subprocess.run(
            [*drop_to(uid, gid), candidate, "-c", check], capture_output=True, check=False
        )
        if tried.returncode == 0:
            return candidate
    message = f"no Python 3.11+ with venv that uid {uid} may run among {candidates}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def build_image(root: Path) -> Image:
    stages = parse_dockerfile((ROOT / "Dockerfile").read_text())
    builder, runtime = stages[0], stages[-1]
    assert builder.name == "builder" and runtime.name == "production"
    # The runtime stage takes the virtual environment, and only that, from the builder.
    copies = runtime.all("COPY")
    assert copies == ["--from=builder /opt/venv /opt/venv"], copies
    venv = root / "opt/venv"
    mapping = {"/opt/venv": venv, "/wheels": root / "wheels"}

    # The builder: WORKDIR, its COPYs from the build context, then its RUN commands.
    build_dir = root / "build"
    build_dir.mkdir()
    for args in builder.all("COPY"):
        *sources, target = shlex.split(args)
        destination = build_dir / target
        for source in sources:
            src = ROOT / source
            if src.is_dir():  # Docker copies a directory's contents into the target
                shutil.copytree(
                    src,
                    destination,
                    dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"),
                )
            else:
                destination.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, destination / src.name)
    # `python` and `pip` of the base image: an interpreter that the image's USER can run.
    user, _, group = runtime.last("USER").partition(":")
    uid, gid = int(user), int(group or user)
    shims = root / "shims"
    shims.mkdir()
    (shims / "python").symlink_to(base_python(uid, gid))
    (shims / "pip").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m pip "$@"\n')
    (shims / "pip").chmod(0o755)
    build_env = {**os.environ, **env_of(builder, {})}
    build_env["PATH"] = f"{shims}:{os.environ['PATH']}"
    for command in builder.all("RUN"):
        done = subprocess.run(
            ["bash", "-ec", map_path(command, mapping)],
            cwd=build_dir,
            env=build_env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, f"RUN {command}\n{done.stdout}\n{done.stderr}"
    assert (venv / "bin/enginedge").exists()

    workdir = root / runtime.last("WORKDIR").lstrip("/")
    env = env_of(runtime, BASE_ENV)
    data_dir = root / env["ENGINEDGE_DATA_DIR"].lstrip("/")
    mapping[env["ENGINEDGE_DATA_DIR"]] = data_dir
    env = {key: map_path(value, mapping) for key, value in env.items()}
    env["HOME"] = str(workdir)
    entrypoint = json.loads(runtime.last("ENTRYPOINT"))
    command = json.loads(runtime.last("CMD"))
    assert command == ["enginedge", "serve"], command
    init = None
    if entrypoint:
        assert entrypoint == ["tini", "--"], entrypoint
        init = shutil.which("tini", path=env["PATH"])
    return Image(root, venv, workdir, data_dir, env, command, uid, gid, init)


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    # Not under pytest's tmp_path: its parents are private to the user running the tests.
    root = Path(tempfile.mkdtemp(prefix="enginedge-image-"))
    root.chmod(0o755)
    try:
        built = build_image(root)
        for directory in (built.workdir, built.data_dir):
            directory.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                os.chown(directory, built.uid, built.gid)
        yield built
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- running it --------------------------------------------------------------------------


def start(image: Image, command: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    """``command`` as the image runs it: as USER (when we are root), under the init."""
    prefix = drop_to(image.uid, image.gid)
    if image.init is not None:
        # Not PID 1 here: as a subreaper, tini reaps orphans as it does in a container.
        prefix += [image.init, "-s", "--"]
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*prefix, *command],
            cwd=image.workdir,
            env={**image.env, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def uids(pid: int) -> set[int]:
    """The real and effective uid of ``pid`` and of its children."""
    found: set[int] = set()
    pids = [pid]
    while pids:
        current = pids.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except FileNotFoundError:
            continue
        line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        found.update(int(u) for u in line.split()[1:3])
        pids.extend(int(child) for child in children)
    return found


def wait_until_ready(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            raise AssertionError(f"exited early ({process.returncode}):\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_process(process, signal.SIGKILL)
            raise AssertionError(f"never ready:\n{log.read_text()}")
        time.sleep(0.1)


def submit_until(stop: threading.Event, url: str, accepted: list[str], errors: list[str]) -> None:
    with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=10) as client:
        while not stop.is_set():
            try:
                response = client.post(
                    "/api/orchestrate", json={"taskType": "data.sql", "payload": SQL}
                )
            except httpx.HTTPError:
                time.sleep(0.02)  # shutting down or gone: nothing was accepted
                continue
            if response.status_code == 202:
                accepted.append(response.json()["requestId"])
            elif response.status_code != 503:  # 503 while draining is fine
                errors.append(f"{response.status_code} {response.text[:200]}")
            time.sleep(0.005)


def test_the_image_serves_drains_on_sigterm_and_loses_nothing(image: Image) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = image.root / "serve.log"
    env = {"PORT": str(port), "API_KEYS": KEY}
    assert image.env["HOST"] == "0.0.0.0"  # reachable from outside the container
    process = start(image, image.command, log, **env)
    try:
        wait_until_ready(process, f"{url}/ready", log)
        for probe in ("/live", "/ready", "/health"):
            response = httpx.get(url + probe, timeout=5)
            assert response.status_code == 200, (probe, response.text)
        assert httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok"
        if os.geteuid() == 0:
            assert uids(process.pid) == {image.uid}, "every process runs as the image's USER"
        else:
            assert 0 not in uids(process.pid)

        accepted: list[str] = []
        errors: list[str] = []
        stop = threading.Event()
        clients = [
            threading.Thread(target=submit_until, args=(stop, url, accepted, errors))
            for _ in range(6)
        ]
        for client in clients:
            client.start()
        try:
            deadline = time.monotonic() + 20
            while len(accepted) < 60 and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(process.pid, signal.SIGTERM)  # under load
            code = process.wait(60)
        finally:
            stop.set()
            for client in clients:
                client.join(15)
    finally:
        stop_process(process, signal.SIGKILL)
    assert code == 0, f"exit code {code} after SIGTERM:\n{log.read_text()}"
    assert not errors, errors[:5]
    assert len(accepted) >= 60
    assert "Traceback" not in log.read_text()

    # Every accepted request is in the store; the unfinished ones are waiting, not lost.
    with sqlite3.connect(image.data_dir / "enginedge.db") as db:
        stored = dict(db.execute("SELECT id, status FROM requests").fetchall())
    statuses = [stored.get(rid.replace("-", "")) for rid in accepted]
    assert None not in statuses, "an accepted request is missing from the store"
    assert set(statuses) <= {*TERMINAL, "PENDING", "DISPATCHED", "PROCESSING"}

    # A restart on the same data directory finishes them all.
    again = start(image, image.command, log, **env)
    try:
        wait_until_ready(again, f"{url}/ready", log)
        with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=10) as client:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                page = client.get(
                    "/api/requests", params={"status": "PENDING,DISPATCHED,PROCESSING"}
                ).json()
                if not page["items"]:
                    break
                time.sleep(0.2)
            final = {rid: client.get(f"/api/requests/{rid}").json() for rid in accepted}
        unfinished = {rid: body.get("status") for rid, body in final.items()}
        assert set(unfinished.values()) == {"COMPLETED"}, unfinished
        results = [body["result"] for body in final.values()]
        assert all(result == {"columns": ["n"], "rows": [[42857]]} for result in results)
    finally:
        assert stop_process(again) == 0, log.read_text()


def test_the_image_runs_a_worker(image: Image) -> None:
    health_port = free_port()
    log = image.root / "worker.log"
    with kafka_broker() as broker:
        process = start(
            image,
            ["enginedge", "worker", "--type", "data-processing"],
            log,
            KAFKA_BROKERS=f"127.0.0.1:{broker.port}",
            WORKER_HEALTH_PORT=str(health_port),
        )
        try:
            wait_until_ready(process, f"http://127.0.0.1:{health_port}/health", log)
            body = httpx.get(f"http://127.0.0.1:{health_port}/health", timeout=5).json()
            assert body["type"] == "data-processing" and body["status"] == "HEALTHY"
            if os.geteuid() == 0:
                assert uids(process.pid) == {image.uid}
        finally:
            code = stop_process(process)
    assert code == 0, log.read_text()
