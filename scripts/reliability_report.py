#!/usr/bin/env python3
"""Turn the fault suite's figures (artifacts/reliability/*.json, written by tests/faults)
into the tables of docs/reliability.md, between its `<!-- figures:start -->` and
`<!-- figures:end -->` markers. Usage: python scripts/reliability_report.py [figures-dir]"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
START, END = "<!-- figures:start -->", "<!-- figures:end -->"
SCENARIOS = [
    ("worker-sigkill", "Worker killed (SIGKILL) mid-request"),
    ("worker-sigstop", "Worker frozen (SIGSTOP), resumed (SIGCONT) after the TTL"),
    ("worker-partition", "Worker partitioned (netns, veth down), then healed"),
    ("orchestrator-sigkill", "Orchestrator killed (SIGKILL) right after its 202s, restarted"),
    ("broker-restart", "Broker killed and restarted (empty: memory-only)"),
    ("postgres-restart", "PostgreSQL stopped and restarted"),
    ("redis-restart", "Redis killed and restarted (empty)"),
]


def _fmt(d: dict[str, Any] | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in (d or {}).items()) or "-"


def _api(d: dict[str, Any]) -> str:
    codes = d.get("apiDuringOutage") or d.get("apiDuringFault")
    if not codes:
        return "-"
    # "POST /x 503 CODE" says more than "POST /x 503": keep the one with the error code.
    coded = {k.rsplit(" ", 1)[0] for k in codes if len(k.split()) == 4}
    return "; ".join(f"{k} x{v}" for k, v in codes.items() if k not in coded) or "-"


def scenarios(figures: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| scenario | in flight at the fault | accepted | outcome | lost | duplicated | "
        "recovery (s) | all terminal (s) | API while it lasted |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, title in SCENARIOS:
        d = figures.get(key)
        if d is None:
            lines.append(f"| {title} | not run | | | | | | | |")
            continue
        lines.append(
            f"| {title} | {_fmt(d.get('inFlight'))} | {d['accepted']} | {_fmt(d['outcome'])} | "
            f"{d['lost']} | {d['duplicated']} | {d['recoverySeconds']} | "
            f"{d['allTerminalSeconds']} | {_api(d)} |"
        )
    lines.append("")
    lines.append(
        "Recovery, per scenario: "
        + "; ".join(
            f"*{key}*: {figures[key]['recoveryMeaning']}" for key, _ in SCENARIOS if key in figures
        )
        + "."
    )
    extras = []
    for key in ("worker-sigstop", "worker-partition"):
        d = figures.get(key)
        if d:
            ran = d.get("resumedWorkerRanAfterwards", d.get("healedWorkerRanAfterwards"))
            extras.append(
                f"*{key}*: late results of the superseded attempt ignored (metric "
                f"`enginedge_results_ignored_total`): {d['lateResultsIgnored']:g}; then, alone, "
                f"the same worker ran {ran} new requests (it consumes again)"
            )
    if extras:
        lines.append("")
        lines.append("; ".join(extras) + ".")
    return lines


def inputs(figures: dict[str, dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    fuzz = figures.get("api-fuzz")
    if fuzz:
        ops = sorted({k.rsplit(" ", 1)[0] for k in fuzz["byOperationAndStatus"]})
        statuses: dict[str, int] = {}
        for key, n in fuzz["byOperationAndStatus"].items():
            code = key.rsplit(" ", 1)[1]
            statuses[code] = statuses.get(code, 0) + n
        lines += [
            f"- **OpenAPI fuzzing (schemathesis)**: {fuzz['calls']} calls over {len(ops)} "
            f"method/path pairs ({fuzz['examplesPerOperation']} examples per operation); "
            f"server errors: {fuzz['serverErrors']}; statuses seen: {_fmt(statuses)}.",
        ]
    msg = figures.get("message-fuzz")
    if msg:
        lines.append(
            f"- **Consumed messages (hypothesis)**: tried {_fmt(msg['messagesTried'])}; "
            f"dead-lettered {_fmt(msg['deadLettered'])} (the rest were well-formed: recorded, "
            "or run)."
        )
    bad = figures.get("bad-input")
    if bad:
        lines.append(
            f"- **Hostile HTTP input**: server errors {bad['serverErrors']}; by case "
            "(status xcount, 0 = connection closed by the server):"
        )
        lines.append("")
        lines.append("  | case | answers |")
        lines.append("  |---|---|")
        for case, codes in bad["cases"].items():
            lines.append(f"  | {case} | {'; '.join(f'{c} x{n}' for c, n in codes.items())} |")
    keys = figures.get("bad-keys-rate")
    if keys:
        lines += [
            "",
            f"- **Wrong API keys at a high rate**: {keys['requests']} in {keys['seconds']} s "
            f"(~{keys['rate']}/s, 50 concurrent): all 401; a good key right after completes "
            "within 5 s.",
        ]
    return lines


def load_section(figures: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for key, label in (("soak", "full soak"), ("soak-short", "CI soak")):
        d = figures.get(key)
        if not d:
            continue
        o, w = d["orchestrator"], d["worker"]
        lines += [
            f"- **{label}**: {d['seconds']} s at {d['rate']:g} requests/s "
            f"({d['requests']} requests, {d['completed']} completed, errors {d['errors']}, "
            f"duplicated {d['duplicated']}); round trip p50 {d['latencyP50']} s, "
            f"p99 {d['latencyP99']} s; at most {d['peakCallers']} callers in flight.",
            "",
            "  | process | RSS after warm-up → end (max), MiB | descriptors other than "
            "sockets | PostgreSQL conns | broker conns | Redis conns |",
            "  |---|---|---|---|---|---|",
        ]
        for name, f in (("orchestrator", o), ("worker", w)):
            lines.append(
                f"  | {name} | {f['rssMbAfterWarmup']} → {f['rssMbEnd']} ({f['rssMbMax']}) | "
                f"{f['otherFdsAfterWarmup']} → {f['otherFdsEnd']} | "
                f"{f['pgAfterWarmup']} → {f['pgEnd']} (max {f['pgMax']}) | "
                f"{f['brokerAfterWarmup']} → {f['brokerEnd']} (max {f['brokerMax']}) | "
                f"{f['redisAfterWarmup']} → {f['redisEnd']} (max {f['redisMax']}) |"
            )
        lines += [
            "",
            f"  PostgreSQL sessions of the database: {_fmt(d['pgSessions'])}.",
            "",
        ]
    return lines


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "artifacts" / "reliability"
    figures = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    stamps = sorted(d["recordedAt"] for d in figures.values())
    body = [
        START,
        f"_Generated by `scripts/reliability_report.py` from {len(figures)} figure files "
        f"recorded {stamps[0]} … {stamps[-1]} (UTC)._"
        if stamps
        else "_No figures._",
        "",
        "### Faults",
        "",
        *scenarios(figures),
        "",
        "### Inputs tried",
        "",
        *inputs(figures),
        "",
        "### Load",
        "",
        *load_section(figures),
        END,
    ]
    text = DOC.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(head + "\n".join(body) + tail)
    print(f"updated {DOC.relative_to(ROOT)} from {len(figures)} files in {folder}")


if __name__ == "__main__":
    main()
