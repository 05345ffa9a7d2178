"""The ASGI app factory: ``uvicorn --factory enginedge.entrypoints.asgi:create``."""

from __future__ import annotations

from fastapi import FastAPI

from enginedge.adapters.http.app import create_app
from enginedge.adapters.telemetry.logging import configure_logging
from enginedge.bootstrap import build_service
from enginedge.config import ApiKey, Settings, ensure_api_keys, load_settings
from enginedge.worker import WorkerApp


def build_app(
    settings: Settings,
    extra_workers: list[WorkerApp] | None = None,
    keys: list[ApiKey] | None = None,
) -> FastAPI:
    """An app for ``settings``; ``extra_workers`` run in-process beside the built-in ones;
    ``keys`` (default: from ``settings``, or the generated development key) are accepted."""
    if keys is None:
        keys, _ = ensure_api_keys(settings)
    return create_app(build_service(settings, extra_workers), keys, settings.max_body_bytes)


def create() -> FastAPI:
    """Factory for ASGI servers: settings from the environment."""
    settings = load_settings()
    configure_logging(settings.log_level)
    return build_app(settings)
