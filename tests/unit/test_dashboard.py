"""The Grafana dashboard shipped in deploy/ plots only series the service exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from enginedge.adapters.telemetry.metrics import PrometheusMetrics

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "main-hexagon-dashboard.json"


def test_every_panel_queries_a_series_the_service_exports() -> None:
    exported = {m.name for m in PrometheusMetrics().registry.collect()}
    exported |= {f"{name}_total" for name in exported} | {f"{n}_bucket" for n in exported}
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len(panels) >= 10
    for panel in panels:
        for target in panel["targets"]:
            names = set(re.findall(r"enginedge_[a-z_]+", target["expr"]))
            assert names, panel["title"]
            assert names <= exported, (panel["title"], names - exported)
