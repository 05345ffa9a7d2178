"""The ``enginedge`` command (SPEC §11).

Exit codes: 0 success; 1 the request ended other than COMPLETED (``--wait``); 2 bad usage
or configuration; 3 the API answered an error or could not be reached.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid
from pathlib import Path
from typing import Annotated, Any, NoReturn

import orjson
import typer
from rich.console import Console
from rich.table import Table

from enginedge import __version__
from enginedge.config import VARIABLES, ConfigError, Settings, ensure_api_keys, load_settings
from enginedge.entrypoints.client import ApiError, Client, find_api_key

EXIT_NOT_COMPLETED = 1
EXIT_USAGE = 2
EXIT_API = 3

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

app = typer.Typer(
    name="enginedge",
    help="EnginEdge Main Hexagon: an orchestrator for AI/ML workloads.\n\n"
    "Exit codes: 0 success, 1 request did not complete (--wait), 2 bad usage or "
    "configuration, 3 API error or unreachable.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

UrlOption = Annotated[
    str, typer.Option("--url", envvar="ENGINEDGE_URL", help="Base URL of the service")
]
KeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        help="API key (default: ENGINEDGE_API_KEY, API_KEYS, or the development "
        "key in ENGINEDGE_DATA_DIR)",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print raw JSON")]
DEFAULT_URL = "http://localhost:3000"


def _fail(message: str, code: int) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)


def _client(url: str, api_key: str | None) -> Client:
    return Client(url.rstrip("/"), find_api_key(api_key))


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def _variables_help() -> str:
    return "\n\n".join(
        f"{v.name} (default {v.default if v.default is not None else 'unset'}): {v.help}"
        for v in VARIABLES
    )


@app.command(
    help="Run the orchestrator (HTTP API and background loops).\n\n"
    "Configured by environment variables:\n\n" + _variables_help()
)
def serve(
    host: Annotated[str | None, typer.Option(help="Override HOST")] = None,
    port: Annotated[int | None, typer.Option(help="Override PORT", min=1, max=65535)] = None,
) -> None:
    import uvicorn

    from enginedge.adapters.http.serving import Server
    from enginedge.adapters.telemetry.logging import configure_logging
    from enginedge.bootstrap import StartupError, preflight
    from enginedge.entrypoints.asgi import build_app
    from enginedge.entrypoints.collector import settle_for_service

    settings = _settings()
    configure_logging(settings.log_level)
    keys, generated = ensure_api_keys(settings)
    if generated is not None:
        err.print(
            "[yellow]No API_KEYS set[/yellow]: development API key, an operator key that "
            f"sees every tenant's requests (kept in {settings.data_dir / 'api-key'}):\n"
            f"  {generated}",
            highlight=False,
        )
    try:
        fastapi_app = build_app(settings, keys=keys)
        asyncio.run(preflight(settings))
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)
    except StartupError as exc:
        _fail(str(exc), EXIT_API)
    config = uvicorn.Config(
        fastapi_app,
        host=host or settings.host,
        port=port or settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=30,
        server_header=False,
    )
    server = Server(config, on_shutdown=fastapi_app.state.service.begin_shutdown)
    settle_for_service()
    # Uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again against
    # the handler it found: with these no-op handlers, a graceful shutdown exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if not server.started:
        _fail("the service did not start; see the log above", EXIT_USAGE)


@app.command(
    help="Run a built-in worker as its own process against Kafka (KAFKA_BROKERS). "
    "SIGTERM drains it: running tasks finish (up to 30 s; what does not is handed back "
    "to the orchestrator, to run elsewhere), then it exits 0."
)
def worker(
    worker_type: Annotated[str, typer.Option("--type", help="data-processing or llm")],
    capacity: Annotated[
        int | None, typer.Option(min=1, help="Concurrent tasks (default BUILTIN_WORKER_CAPACITY)")
    ] = None,
    worker_id: Annotated[
        str | None, typer.Option("--id", help="Worker id, a UUID (default: a new one)")
    ] = None,
) -> None:
    from enginedge.adapters.telemetry.logging import configure_logging
    from enginedge.entrypoints.collector import settle_for_service
    from enginedge.entrypoints.worker_process import run_worker
    from enginedge.worker.builtin import builtin_app

    settings = _settings()
    configure_logging(settings.log_level)
    if worker_id is not None:
        try:
            worker_id = str(uuid.UUID(worker_id))
        except ValueError:
            _fail("--id must be a UUID", EXIT_USAGE)
    try:
        app_ = builtin_app(worker_type, settings, capacity)
        settle_for_service()
        asyncio.run(run_worker(app_, settings, worker_id))
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)


@app.command(
    help="Measure round-trip throughput and latency through the HTTP API with the echo task. "
    "Starts the orchestrator (and in distributed mode a worker process) itself, unless "
    "--mode external drives a running service."
)
def bench(
    mode: Annotated[
        str, typer.Option(help="embedded, distributed (DATABASE_URL, KAFKA_BROKERS) or external")
    ] = "embedded",
    requests: Annotated[int, typer.Option(min=1, help="Round trips measured")] = 5000,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight")] = 64,
    warmup: Annotated[int, typer.Option(min=0, help="Round trips before measuring")] = 200,
    url: Annotated[str | None, typer.Option(help="external mode: the service's URL")] = None,
    api_key: Annotated[str | None, typer.Option(help="external mode: an API key")] = None,
    database_url: Annotated[
        str | None, typer.Option(envvar="DATABASE_URL", help="distributed mode")
    ] = None,
    kafka_brokers: Annotated[
        str | None, typer.Option(envvar="KAFKA_BROKERS", help="distributed mode")
    ] = None,
    redis_url: Annotated[
        str | None, typer.Option(envvar="REDIS_URL", help="distributed mode")
    ] = None,
    log_dir: Annotated[
        Path | None, typer.Option(help="Keep the started processes' logs here")
    ] = None,
    flow: Annotated[
        str,
        typer.Option(
            help="submit-wait: POST /api/orchestrate?wait= answers with the outcome; poll: "
            "POST answers 202, then GET /api/requests/{id}?wait="
        ),
    ] = "submit-wait",
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON")] = False,
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from enginedge.entrypoints.bench import BenchConfig, BenchError, run_bench

    if mode not in ("embedded", "distributed", "external"):
        _fail("--mode must be embedded, distributed or external", EXIT_USAGE)
    config = BenchConfig(
        mode=mode,  # type: ignore[arg-type]
        requests=requests,
        concurrency=concurrency,
        warmup=warmup,
        url=url,
        api_key=api_key,
        database_url=database_url,
        kafka_brokers=kafka_brokers,
        redis_url=redis_url,
        log_dir=log_dir,
        flow=flow,  # type: ignore[arg-type]
    )
    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )
    try:
        with progress:
            task = progress.add_task(f"{mode}, {concurrency} in flight", total=requests)
            report = run_bench(config, on_done=lambda: progress.advance(task))
    except BenchError as exc:
        _fail(str(exc), EXIT_API)
    if as_json:
        _print_json(report.as_dict())
        # The same exit code as the table's: a script must not take a failed run for figures.
        if report.errors:
            raise typer.Exit(EXIT_API)
        return
    table = Table(title=f"enginedge bench: {mode}, {concurrency} in flight, {flow}")

    def per_round_trip(seconds: float) -> str:
        return f"{1000 * seconds / max(report.completed, 1):.2f} ms per round trip"

    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("round trips", f"{report.completed} of {report.requests} ({report.errors} errors)"),
        ("throughput", f"{report.throughput} requests/s"),
        *((f"latency {k}", f"{v} ms") for k, v in report.latency_ms.items()),
        ("orchestrator CPU", f"{report.orchestrator_cpu_seconds} s"),
        ("orchestrator peak RSS", f"{report.orchestrator_peak_rss_mb} MB"),
        (
            f"machine CPU ({report.machine_cores} cores)",
            f"{report.machine_cpu_seconds} s, {per_round_trip(report.machine_cpu_seconds)}",
        ),
        *(
            (f"  {name}", f"{spent} s, {per_round_trip(spent)}")
            for name, spent in report.cpu_seconds_by_process.items()
        ),
    ]
    if report.machine_cpu_seconds > 0:
        # Were every core busy at this cost per round trip, this is as fast as it could go.
        ceiling = report.machine_cores * report.completed / report.machine_cpu_seconds
        rows.append(("throughput all cores would carry", f"{ceiling:.0f} requests/s"))
    for name, value in rows:
        table.add_row(name, value)
    out.print(table)
    for sample in report.error_samples:
        err.print(f"[red]error[/red]: {sample}", highlight=False)
    if report.errors:
        raise typer.Exit(EXIT_API)


@app.command(help="Apply database migrations to DATABASE_URL (or the embedded SQLite file).")
def migrate() -> None:
    from enginedge.adapters.store.engine import connect_with_retries, create_engine
    from enginedge.adapters.store.migrate import head_revision, upgrade
    from enginedge.bootstrap import pool_from

    settings = _settings()

    async def run() -> None:
        engine = create_engine(settings.effective_database_url, pool_from(settings))
        try:
            await connect_with_retries(engine, pool_from(settings))
            await upgrade(engine)
        finally:
            await engine.dispose()

    try:
        asyncio.run(run())
    except Exception as exc:
        _fail(f"migration failed: {type(exc).__name__}: {exc}", EXIT_API)
    out.print(f"database schema is at revision {head_revision()}")


def _parse_json(text: str, what: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        _fail(f"{what} is not valid JSON: {exc}", EXIT_USAGE)
    if not isinstance(value, dict):
        _fail(f"{what} must be a JSON object", EXIT_USAGE)
    return value


@app.command(
    help="Submit a task. PAYLOAD is a JSON object ('-' reads it from stdin).\n\n"
    "Example: enginedge submit data.sql "
    '\'{"sql": "select sum(x) as s from t", "tables": {"t": [{"x": 1}, '
    '{"x": 2}]}}\' --wait'
)
def submit(
    task_type: Annotated[str, typer.Argument(help="e.g. data.sql, data.describe, llm.chat")],
    payload: Annotated[str | None, typer.Argument(help="JSON object")] = None,
    payload_file: Annotated[
        Path | None,
        typer.Option("--payload-file", "-f", help="Read the payload from this JSON file"),
    ] = None,
    metadata: Annotated[
        str | None,
        typer.Option(
            "--metadata", "-m", help="JSON object: priority, correlationId, timeout, callbackUrl"
        ),
    ] = None,
    idempotency_key: Annotated[str | None, typer.Option("--idempotency-key")] = None,
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="Follow the request to its end, showing progress")
    ] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    if payload is not None and payload_file is not None:
        _fail("give the payload as an argument or with --payload-file, not both", EXIT_USAGE)
    if payload_file is not None:
        try:
            text = payload_file.read_text()
        except OSError as exc:
            _fail(f"cannot read {payload_file}: {exc.strerror}", EXIT_USAGE)
    elif payload == "-":
        text = sys.stdin.read()
    elif payload is not None:
        text = payload
    else:
        _fail("a payload is needed: a JSON object, '-' for stdin, or --payload-file", EXIT_USAGE)
    body = _parse_json(text, "the payload")
    meta = _parse_json(metadata, "--metadata") if metadata else None
    client = _client(url, api_key)
    try:
        accepted = client.submit(task_type, body, meta, idempotency_key)
    except ApiError as exc:
        _fail(f"{exc.code}: {exc.message}", EXIT_API)
    if not wait:
        if as_json:
            _print_json(accepted)
        else:
            out.print(
                f"accepted {accepted['requestId']} ({accepted['workerType']})", highlight=False
            )
        return
    _follow(client, accepted["requestId"], as_json)


def _follow(client: Client, request_id: str, as_json: bool) -> None:
    final: dict[str, Any] | None = None
    streamed = False
    try:
        with err.status(f"{request_id}: PENDING") as spinner:
            for kind, data in client.events(request_id):
                if kind == "progress":
                    chunk = data.get("chunk")
                    text = (
                        chunk
                        if isinstance(chunk, str)
                        else (chunk.get("text") if isinstance(chunk, dict) else None)
                    )
                    if isinstance(text, str):
                        spinner.stop()
                        err.out(text, end="", highlight=False)
                        streamed = True
                    else:
                        spinner.update(f"{request_id}: progress {data.get('seq')}")
                elif kind == "status":
                    spinner.update(
                        f"{request_id}: {data['status']} (attempt {data.get('attempt')})"
                    )
        if streamed:
            err.print()
        final = client.status(request_id)
    except ApiError as exc:
        _fail(f"{exc.code}: {exc.message}", EXIT_API)
    assert final is not None
    if as_json:
        _print_json(final)
    elif final["status"] == "COMPLETED":
        _print_json(final["result"])
    else:
        err.print(f"[red]{final['status']}[/red]: {final.get('error')}", highlight=False)
    if final["status"] != "COMPLETED":
        raise typer.Exit(EXIT_NOT_COMPLETED)


@app.command(help="Show a request: status, attempts, worker, result or error.")
def status(
    request_id: Annotated[str, typer.Argument()],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
) -> None:
    try:
        _print_json(_client(url, api_key).status(request_id))
    except ApiError as exc:
        _fail(f"{exc.code}: {exc.message}", EXIT_API)


@app.command(help="Cancel a request that has not finished.")
def cancel(
    request_id: Annotated[str, typer.Argument()],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
) -> None:
    try:
        result = _client(url, api_key).cancel(request_id)
    except ApiError as exc:
        _fail(f"{exc.code}: {exc.message}", EXIT_API)
    out.print(f"{result['requestId']} is {result['status']}", highlight=False)


@app.command(help="List the worker registry.")
def workers(
    url: UrlOption = DEFAULT_URL, api_key: KeyOption = None, as_json: JsonOption = False
) -> None:
    try:
        items = _client(url, api_key).workers()
    except ApiError as exc:
        _fail(f"{exc.code}: {exc.message}", EXIT_API)
    if as_json:
        _print_json(items)
        return
    table = Table("worker", "type", "status", "load", "capabilities", "last heartbeat")
    for w in items:
        table.add_row(
            w["workerId"],
            w["type"],
            w["status"],
            f"{w['active']}/{w['capacity']}",
            ", ".join(w["capabilities"]),
            w["lastHeartbeat"],
        )
    out.print(table)


def _version(value: bool) -> None:
    if value:
        out.print(f"enginedge {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version and exit"
        ),
    ] = False,
) -> None:
    """EnginEdge Main Hexagon."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
