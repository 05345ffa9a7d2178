"""A network partition of one worker: the worker process runs in a network namespace of its
own, joined to the host by a veth pair; cutting the link (``ip link set ... down``) leaves it
running with every connection silently dead. Its requests run again on the other worker;
when the link comes back its late results change nothing, and it consumes again.

Needs root and ``ip`` (iproute2) with network namespaces; skipped otherwise."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.faults.support import (
    FaultCluster,
    H,
    Load,
    check,
    ignored_results,
    in_flight,
    kill,
    record,
    verdict,
    wait_all_terminal,
    worker_endpoint,
)
from tests.support.harness import wait_worker
from tests.support.servers import (
    Restartable,
    free_port,
    postgres_server,
    redis_server,
    tansu_binary,
)

NS = f"edfault{os.getpid() % 10000}"
HOST_IF, NS_IF = f"{NS}h", f"{NS}n"
HOST_IP, NS_IP = "10.213.7.1", "10.213.7.2"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _namespaces_usable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run as root to include it"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"{NS}p"
    try:
        _ip("netns", "add", probe)
        _ip("netns", "del", probe)
    except subprocess.CalledProcessError as exc:
        return f"ip netns does not work here: {exc.stderr.decode(errors='replace').strip()}"
    return None


@pytest.fixture
def netns() -> Iterator[str]:
    reason = _namespaces_usable()
    if reason:
        pytest.skip(reason)
    _ip("netns", "add", NS)
    try:
        _ip("link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF)
        _ip("link", "set", NS_IF, "netns", NS)
        _ip("addr", "add", f"{HOST_IP}/30", "dev", HOST_IF)
        _ip("link", "set", HOST_IF, "up")
        _ip("netns", "exec", NS, "ip", "addr", "add", f"{NS_IP}/30", "dev", NS_IF)
        _ip("netns", "exec", NS, "ip", "link", "set", NS_IF, "up")
        _ip("netns", "exec", NS, "ip", "link", "set", "lo", "up")
        yield NS
    finally:
        subprocess.run(["ip", "link", "del", HOST_IF], capture_output=True)
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


@pytest.fixture
def partition_cluster(netns: str, tmp_path: Path) -> Iterator[FaultCluster]:
    # The broker listens on, and advertises, the host end of the veth: both sides reach it.
    port = free_port()
    url = f"tcp://{HOST_IP}:{port}"
    workdir = Path(tempfile.mkdtemp(prefix="enginedge-kafka-ns-"))
    broker = Restartable(
        [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ],
        port,
        workdir,
    )
    broker.start = lambda: _start_on(broker, HOST_IP)  # type: ignore[method-assign]
    with postgres_server() as pg, redis_server() as redis:
        broker.start()
        cluster = PartitionCluster(tmp_path, pg.url, broker, redis)
        try:
            yield cluster
        finally:
            cluster.stop_all()
            broker.stop()
            shutil.rmtree(workdir, ignore_errors=True)


def _start_on(server: Restartable, host: str) -> None:
    with open(server.workdir / "server.log", "ab") as log:
        server.process = subprocess.Popen(
            server.args, stdout=log, stderr=subprocess.STDOUT, cwd=server.workdir
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, server.port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError("the broker never listened")


class PartitionCluster(FaultCluster):
    @property
    def brokers(self) -> str:
        return f"{HOST_IP}:{self.broker.port}"


async def test_worker_partitioned_then_healed(
    partition_cluster: FaultCluster, http: httpx.AsyncClient
) -> None:
    c = partition_cluster
    url = c.start_replica()
    c.start_fault_worker(capacity=3)  # on the host
    isolated, _ = c.start_fault_worker(capacity=3, prefix=["ip", "netns", "exec", NS], host=NS_IP)
    c.wait_for_workers(url, 2)
    load = Load(url, http)
    await load.submit_many(fast=60, slow=6)
    # Wait until the namespaced worker holds a slow request. The scheduler hands each one to
    # the worker with the most free slots at that moment, which need not ever be the
    # namespaced one for six of them: more are sent while none waits.
    deadline = time.monotonic() + 120
    more = 0
    while True:
        slow = [rid for rid, (kind, _) in load.accepted.items() if kind == "slow"]
        bodies = [(await http.get(f"{url}/api/requests/{r}", headers=H)).json() for r in slow]
        processing = {
            b["requestId"]: b["workerId"] for b in bodies if b.get("status") == "PROCESSING"
        }
        endpoints = {w: await worker_endpoint(url, http, w) for w in set(processing.values())}
        inside = [w for w, e in endpoints.items() if NS_IP in e]
        if inside or time.monotonic() > deadline:
            break
        waiting = [b for b in bodies if b.get("status") in ("PENDING", "DISPATCHED")]
        if not waiting and more < 15:
            for i in range(3):
                await load.submit("slow", 500 + more + i)
            more += 3
        await asyncio.sleep(0.2)
    assert inside, f"the namespaced worker never took a slow request ({more} more sent)"
    victim_id = inside[0]
    held = [rid for rid, w in processing.items() if w == victim_id]
    caught = await in_flight(c.database_url, load)
    ignored_before = await ignored_results([url], http)

    _ip("link", "set", HOST_IF, "down")  # the partition: the worker runs on, cut off
    cut_at = time.monotonic()
    try:
        while True:
            bodies = [(await http.get(f"{url}/api/requests/{r}", headers=H)).json() for r in held]
            if all(b["status"] == "COMPLETED" for b in bodies):
                break
            assert time.monotonic() - cut_at < 120, bodies
            await asyncio.sleep(0.3)
        recovery = time.monotonic() - cut_at
        await asyncio.sleep(max(0.0, 8 - recovery))
    finally:
        _ip("link", "set", HOST_IF, "up")
    partitioned_for = time.monotonic() - cut_at
    await wait_all_terminal(c.database_url, load, timeout=150)
    drained = time.monotonic() - cut_at
    v = await verdict(c.database_url, load)
    check(v, load)
    assert isolated.poll() is None  # it kept running throughout

    # Healed: its stale results change nothing, and it consumes again on its own.
    ignored = 0.0
    for _ in range(60):
        ignored = await ignored_results([url], http) - ignored_before
        if ignored >= 1:
            break
        await asyncio.sleep(0.5)
    kill(c.workers[0])  # the host worker goes: only the healed one is left
    await wait_worker(url, http, victim_id, headers=H)
    after = Load(url, http)
    await after.submit_many(fast=20, start=7000)
    await wait_all_terminal(c.database_url, after, timeout=150)
    workers_after = {
        (await http.get(f"{url}/api/requests/{rid}", headers=H)).json()["workerId"]
        for rid in after.accepted
    }
    v_late = await verdict(c.database_url, load)
    record(
        "worker-partition",
        fault="worker in its own network namespace; its veth link set down, then up",
        inFlight=caught,
        heldByVictim=len(held),
        partitionedSeconds=round(partitioned_for, 1),
        accepted=len(load.accepted),
        outcome=v.statuses,
        recoverySeconds=round(recovery, 2),
        recoveryMeaning="link down -> the cut-off worker's requests COMPLETED elsewhere",
        allTerminalSeconds=round(drained, 2),
        lateResultsIgnored=ignored,
        healedWorkerRanAfterwards=len(after.accepted) if workers_after == {victim_id} else 0,
        lost=v.lost,
        duplicated=v_late.duplicated,
        wrong=v_late.wrong,
        max_attempts=v.max_attempts,
    )
    assert (v_late.statuses, v_late.duplicated, v_late.wrong) == (v.statuses, 0, 0)
    for rid in held:
        assert v.rows[rid]["attempts"] >= 2
    assert workers_after == {victim_id}
