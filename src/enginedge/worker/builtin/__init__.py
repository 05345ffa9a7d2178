"""The reference workers shipped with the project, built from configuration."""

from __future__ import annotations

from enginedge.config import ConfigError, Settings
from enginedge.worker.app import WorkerApp
from enginedge.worker.builtin.data_processing import data_processing_worker
from enginedge.worker.builtin.llm import LlmSettings, llm_worker

BUILTIN_TYPES = ("data-processing", "llm")


def builtin_app(worker_type: str, settings: Settings, capacity: int | None = None) -> WorkerApp:
    """The built-in worker named ``worker_type``, configured from ``settings``."""
    capacity = capacity or settings.builtin_worker_capacity
    if worker_type == "data-processing":
        app = data_processing_worker(settings.data_root, capacity)
    elif worker_type == "llm":
        if not settings.llm_base_url:
            raise ConfigError("the llm worker needs LLM_BASE_URL (an OpenAI-compatible API)")
        app = llm_worker(
            LlmSettings(settings.llm_base_url, settings.llm_api_key, settings.llm_model),
            capacity,
        )
    else:
        raise ConfigError(
            f"unknown worker type {worker_type!r}; built-in types: {', '.join(BUILTIN_TYPES)}"
        )
    app.stall_timeout = settings.task_stall_timeout
    return app
