"""`make bench`: run every benchmark against its peer, write the current table and plot rpcmesh vs each peer.

Every bench is one row of :data:`BENCHES`: the script, its arguments, the peer
it runs against (in the same run, rounds alternated inside the script) and the
figures to read from the one JSON line the script prints last. Adding a bench
is one entry. This runner:

- runs them one after the other (``--only ID`` to pick some), skipping with a
  reason a bench whose peer or backend is missing here (etcd, PostgreSQL, NATS);
- keeps every JSON line in ``docs/bench-results.json``;
- writes the current table (figure, the peer's figure, the ratio, the goal,
  met or not) between the markers at the top of ``docs/benchmarks.md``;
- draws ``docs/benchmarks.png``: for every figure, how far rpcmesh is ahead of
  (right of the line) or behind (left) its peer or its goal.

Ends by printing one JSON line of every result.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "bench-results.json"
PAGE = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "benchmarks.png"
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


@dataclass(frozen=True)
class Figure:
    """One figure of a bench's JSON line and what it is held to.

    ``key`` is rpcmesh's figure, ``peer_key`` the peer's figure in the same line
    (``None`` when the bench has no peer for it; ``peer`` names it when it is not
    the bench's own peer), ``ratio_key`` the bench's own
    paired ratio when it prints one (else ``key / peer_key``). ``higher``: a
    rate (ahead of the peer means ratio ≥ 1.0) rather than a latency or size
    (ratio ≤ 1.0). ``limit``: an absolute goal on ``key`` besides the ratio.
    ``ratio_goal`` replaces the default 1.0 where the issue set another one.
    """

    label: str
    key: str
    higher: bool
    unit: str = ""
    peer_key: str | None = None
    ratio_key: str | None = None
    ratio_goal: float = 1.0
    limit: float | None = None
    peer: str | None = None  # the peer's name when it is not the bench's


@dataclass(frozen=True)
class Bench:
    id: str
    script: str
    args: tuple[str, ...]
    peer: str
    figures: tuple[Figure, ...]
    needs: tuple[str, ...] = ()  # "etcd", "postgresql", "nats"
    title: str = ""


def F(label: str, key: str, higher: bool, unit: str = "", **kw: Any) -> Figure:
    return Figure(label, key, higher, unit, **kw)


_REGISTRY_FIGURES = (
    F("registrations/s (lease + instance)", "register_per_s", True, "/s", peer_key="etcd_register_per_s"),
    F(
        "server CPU per registration",
        "register_server_cpu_us",
        False,
        "µs",
        peer_key="etcd_register_server_cpu_us",
    ),
    F(
        "server CPU per lease renewal",
        "renew_server_cpu_us",
        False,
        "µs",
        peer_key="etcd_renew_server_cpu_us",
    ),
    F("Resolve p50 (etcd: prefix Range)", "resolve_p50_ms", False, "ms", peer_key="etcd_resolve_p50_ms"),
    F("Resolve p99", "resolve_p99_ms", False, "ms", peer_key="etcd_resolve_p99_ms", limit=5.0),
    F(
        "watch p99 from the deregistration's send, 100 watchers, bursts of 1,000",
        "watch_p99_ms",
        False,
        "ms",
        peer_key="etcd_watch_p99_ms",
        limit=50.0,
    ),
    F(
        "watch p99 from the deregistration's acknowledgement (same bursts)",
        "watch_after_ack_p99_ms",
        False,
        "ms",
        peer_key="etcd_watch_after_ack_p99_ms",
        limit=50.0,
    ),
    F("server RSS at 10k instances", "rss_mb", False, "MB", peer_key="etcd_rss_mb", limit=200.0),
    F("RSS the 10k instances add", "rss_added_mb", False, "MB", peer_key="etcd_rss_added_mb"),
)
_DBOS_FIGURES = (
    F("3-step sagas/s, 64 concurrent", "sagas_per_s", True, "/s", peer_key="dbos_workflows_per_s"),
    F("saga p50, one at a time", "saga_p50_ms", False, "ms", peer_key="dbos_p50_ms"),
    F(
        "CPU per saga (client + coordinator)",
        "cpu_ms_per_saga",
        False,
        "ms",
        peer_key="dbos_cpu_ms_per_workflow",
    ),
)
_BUS_FIGURES = (
    F(
        "publish msgs/s",
        "bus_publish_per_s",
        True,
        "/s",
        peer_key="jetstream_publish_per_s",
        ratio_key="publish_ratio",
    ),
    F(
        "deliver + ack msgs/s",
        "bus_deliver_per_s",
        True,
        "/s",
        peer_key="jetstream_deliver_per_s",
        ratio_key="deliver_ratio",
    ),
    F(
        "single-message publishes/s",
        "bus_single_publish_per_s",
        True,
        "/s",
        peer_key="jetstream_single_publish_per_s",
        ratio_key="single_publish_ratio",
    ),
    F(
        "publish msgs/s",
        "bus_publish_per_s",
        True,
        "/s",
        peer_key="rabbitmq_publish_per_s",
        ratio_key="rabbitmq_publish_ratio",
        peer="RabbitMQ",
    ),
    F(
        "deliver + ack msgs/s",
        "bus_deliver_per_s",
        True,
        "/s",
        peer_key="rabbitmq_deliver_per_s",
        ratio_key="rabbitmq_deliver_ratio",
        peer="RabbitMQ",
    ),
    F(
        "single-message publishes/s",
        "bus_single_publish_per_s",
        True,
        "/s",
        peer_key="rabbitmq_single_publish_per_s",
        ratio_key="rabbitmq_single_publish_ratio",
        peer="RabbitMQ",
    ),
    F("publish → delivery p99 at 1k msgs/s", "p99_ms_at_1k", False, "ms", limit=20.0),
)


def _eventstore_figures(store: str) -> tuple[Figure, ...]:
    return (
        F(
            f"{store}: single-event appends/s, 16 writers",
            f"rpcmesh_{store}_single_appends_per_s",
            True,
            "/s",
            peer_key=f"eventsourcing_{store}_single_appends_per_s",
            ratio_key=f"{store}_vs_eventsourcing_single_ratio",
        ),
        F(
            f"{store}: events/s in 100-event batches",
            f"rpcmesh_{store}_batch_events_per_s",
            True,
            "/s",
            peer_key=f"eventsourcing_{store}_batch_events_per_s",
            ratio_key=f"{store}_vs_eventsourcing_batch_ratio",
        ),
    )


BENCHES: tuple[Bench, ...] = (
    Bench(
        "client",
        "bench_client.py",
        (),
        "raw grpc.aio",
        (
            F(
                "Echo calls/s, 32 in flight",
                "mesh_throughput_per_s",
                True,
                "/s",
                peer_key="raw_throughput_per_s",
                ratio_key="throughput_ratio",
                ratio_goal=0.90,
            ),
            F(
                "Echo p50, 1 in flight",
                "mesh_p50_ms",
                False,
                "ms",
                peer_key="raw_p50_ms",
                ratio_key="p50_ratio",
                ratio_goal=1.10,
            ),
            F(
                "mesh calls/s, telemetry on ÷ off",
                "mesh_on_calls_per_s",
                True,
                "/s",
                peer_key="mesh_off_calls_per_s",
                ratio_key="mesh_tracing_throughput_ratio",
                ratio_goal=0.90,
                peer="telemetry off",
            ),
            F(
                "client CPU per call",
                "mesh_client_cpu_us_per_call",
                False,
                "µs",
                peer_key="raw_client_cpu_us_per_call",
                ratio_key="client_cpu_ratio",
                ratio_goal=1.10,
            ),
        ),
        title="Mesh channel vs raw grpc.aio",
    ),
    Bench(
        "tracing",
        "bench_tracing.py",
        ("--floor", "--official", "--sampled"),
        "telemetry off",
        (
            F(
                "Echo calls/s, tracing + metrics on ÷ off",
                "on_calls_per_s",
                True,
                "/s",
                peer_key="off_calls_per_s",
                ratio_key="tracing_throughput_ratio",
                ratio_goal=0.90,
            ),
            F(
                "tracing ratio ÷ the official instrumentation's ratio (full sampling)",
                "tracing_throughput_ratio",
                True,
                peer_key="official_throughput_ratio",
                ratio_key="rpcmesh_vs_official",
                ratio_goal=1.6,
                peer="opentelemetry-instrumentation-grpc",
            ),
            F(
                "calls/s ratio, parent-based 1 % sampling + metrics ÷ off",
                "sampled_1pct_throughput_ratio",
                True,
                limit=0.90,
            ),
        ),
        title="Tracing overhead",
    ),
    Bench(
        "registry",
        "bench_registry.py",
        ("--peer", "etcd"),
        "etcd",
        _REGISTRY_FIGURES,
        ("etcd",),
        "Registry (SQLite) vs etcd",
    ),
    Bench(
        "registry_postgresql",
        "bench_registry.py",
        ("--peer", "etcd", "--store", "postgresql"),
        "etcd",
        _REGISTRY_FIGURES,
        ("etcd", "postgresql"),
        "Registry (PostgreSQL) vs etcd",
    ),
    Bench("bus", "bench_bus.py", (), "NATS JetStream", _BUS_FIGURES, ("nats",), "Bus (SQLite)"),
    Bench(
        "bus_nats",
        "bench_bus.py",
        ("--backend", "nats"),
        "raw nats-py (JetStream)",
        _BUS_FIGURES,
        ("nats",),
        "Bus (--bus nats) vs raw nats-py",
    ),
    Bench(
        "saga",
        "bench_saga.py",
        (),
        "direct calls",
        (
            F("3-step sagas/s, 64 concurrent", "sagas_per_s", True, "/s", limit=300.0),
            F(
                "saga p50 ÷ the same 3 calls made directly (paired)",
                "saga_p50_ms",
                False,
                "ms",
                peer_key="direct_p50_ms",
                ratio_key="p50_ratio",
                ratio_goal=2.0,
            ),
            F("EventStore events/s, 100-event batches", "append_events_per_s", True, "/s", limit=10_000.0),
            F("EventStore single-event appends/s", "append_single_events_per_s", True, "/s"),
        ),
        title="Sagas (SQLite)",
    ),
    Bench(
        "saga_scale_out",
        "bench_saga.py",
        ("--store", "postgresql", "--bus", "nats"),
        "direct calls",
        (
            F("3-step sagas/s, 64 concurrent", "sagas_per_s", True, "/s", limit=300.0),
            F(
                "saga p50 ÷ direct calls (paired)",
                "saga_p50_ms",
                False,
                "ms",
                peer_key="direct_p50_ms",
                ratio_key="p50_ratio",
                ratio_goal=2.0,
            ),
            F("EventStore events/s, 100-event batches", "append_events_per_s", True, "/s", limit=10_000.0),
            F("EventStore single-event appends/s", "append_single_events_per_s", True, "/s"),
        ),
        ("postgresql", "nats"),
        "Sagas (PostgreSQL + NATS)",
    ),
    Bench("dbos", "bench_dbos.py", (), "DBOS", _DBOS_FIGURES, (), "Sagas vs DBOS (SQLite)"),
    Bench(
        "dbos_postgresql",
        "bench_dbos.py",
        ("--store", "postgresql"),
        "DBOS",
        _DBOS_FIGURES,
        ("postgresql",),
        "Sagas vs DBOS (PostgreSQL)",
    ),
    Bench(
        "eventstore",
        "bench_eventstore.py",
        (),
        "eventsourcing",
        _eventstore_figures("sqlite")
        + _eventstore_figures("postgresql")
        + (
            F(
                "PostgreSQL ÷ SQLite single-event appends/s (same run)",
                "rpcmesh_postgresql_single_appends_per_s",
                True,
                "/s",
                peer_key="rpcmesh_sqlite_single_appends_per_s",
                ratio_key="postgresql_vs_sqlite_single_ratio",
                ratio_goal=0.8,
                peer="rpcmesh on SQLite",
            ),
        ),
        ("postgresql",),
        "EventStore vs eventsourcing",
    ),
)


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def missing(bench: Bench) -> str | None:
    """Why ``bench`` cannot run here, or None."""
    if not (ROOT / "bench" / bench.script).exists():
        return f"bench/{bench.script} does not exist"
    for need in bench.needs:
        if need == "etcd" and shutil.which("etcd") is None:
            return "etcd is not installed (Debian/Ubuntu: apt-get install etcd-server)"
        if need == "postgresql" and not _reachable("127.0.0.1", 5432):
            return "no PostgreSQL on 127.0.0.1:5432"
        if need == "nats" and not _reachable("127.0.0.1", 4222):
            return "no NATS JetStream on 127.0.0.1:4222"
    return None


def run_bench(bench: Bench) -> dict[str, Any]:
    """Run one bench script; its last JSON stdout line is its figures."""
    reason = missing(bench)
    if reason:
        return {"skipped": reason}
    started = time.monotonic()
    try:
        result = subprocess.run(
            [sys.executable, str(ROOT / "bench" / bench.script), *bench.args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 900 s", "seconds": round(time.monotonic() - started)}
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        return {
            "error": (result.stderr or result.stdout)[-500:],
            "seconds": round(time.monotonic() - started),
        }
    figures: dict[str, Any] = json.loads(lines[-1])
    figures["seconds"] = round(time.monotonic() - started)
    return figures


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and value == value else None


def evaluate(figure: Figure, figures: dict[str, Any]) -> dict[str, Any] | None:
    """The row of one figure: value, peer value, ratio, goal text and whether the goals are met."""
    value = _number(figures.get(figure.key))
    if value is None:
        return None
    peer = _number(figures.get(figure.peer_key)) if figure.peer_key else None
    if figure.peer_key and peer is None and figure.limit is None:
        return None  # this run did not measure the peer (e.g. RabbitMQ in the --bus nats mode)
    ratio = _number(figures.get(figure.ratio_key)) if figure.ratio_key else None
    if ratio is None and peer:
        ratio = value / peer
    goals: list[str] = []
    met = True
    if figure.peer_key:
        sign = "≥" if figure.higher else "≤"
        goals.append(f"ratio {sign} {figure.ratio_goal:g}")
        if ratio is not None:
            met &= ratio >= figure.ratio_goal if figure.higher else ratio <= figure.ratio_goal
    if figure.limit is not None:
        sign = "≥" if figure.higher else "≤"
        goals.append(f"{sign} {figure.limit:,g} {figure.unit}".rstrip())
        met &= value >= figure.limit if figure.higher else value <= figure.limit
    # How far ahead (> 1) or behind (< 1) rpcmesh is: of the peer when there is one, else of its goal.
    if ratio:
        score = ratio / figure.ratio_goal if figure.higher else figure.ratio_goal / ratio
    elif figure.limit and value:
        score = value / figure.limit if figure.higher else figure.limit / value
    else:
        score = None
    return {
        "value": value,
        "peer": peer,
        "ratio": ratio,
        "goal": "; ".join(goals),
        "met": met,
        "score": score,
    }


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return ""
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return f"{text} {unit}".rstrip() if unit and unit != "/s" else f"{text}{unit}"


def table(results: dict[str, dict[str, Any]]) -> str:
    """The current results as one Markdown table."""
    rows = [
        "| bench | figure | rpcmesh | peer | peer's figure | ratio | goal | |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for bench in BENCHES:
        figures = results.get(bench.id)
        if figures is None:
            continue
        name = bench.title or bench.id
        if "skipped" in figures or "error" in figures:
            why = figures.get("skipped") or "failed: " + str(figures["error"]).strip().splitlines()[-1][:120]
            rows.append(f"| {name} | | | {bench.peer} | | | | {why} |")
            continue
        for figure in bench.figures:
            row = evaluate(figure, figures)
            if row is None:
                if _number(figures.get(figure.key)) is None:  # a bench that lost a figure: say so
                    rows.append(f"| {name} | {figure.label} | (not in the JSON line) | | | | | |")
                continue  # else its peer is not part of this mode (RabbitMQ with --backend nats)
            ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else ""
            status = "" if not row["goal"] else "met" if row["met"] else "**not met**"
            peer = (figure.peer or bench.peer) if figure.peer_key else ""
            rows.append(
                f"| {name} | {figure.label} | {_fmt(row['value'], figure.unit)} | {peer} | "
                f"{_fmt(row['peer'], figure.unit)} | {ratio} | {row['goal']} | {status} |"
            )
        if "skipped" in figures:
            rows.append(f"| {name} | | | | | | | {figures['skipped']} |")
    return "\n".join(rows)


def write_page(results: dict[str, dict[str, Any]]) -> None:
    """Replace the table between the markers at the top of docs/benchmarks.md."""
    page = PAGE.read_text()
    if START not in page or END not in page:
        raise SystemExit(f"{PAGE} has no {START} ... {END} markers")
    seconds = sum(int(r.get("seconds", 0)) for r in results.values())
    dates = sorted(str(r["date"]) for r in results.values() if "date" in r)
    when = dates[0] if len(set(dates)) == 1 else f"{dates[0]} to {dates[-1]}" if dates else "unknown"
    block = (
        f"{START}\nCommand: `make bench` (its last step, `.venv/bin/python bench/run_all.py`, runs each "
        f"bench once; `--only ID` reruns one and keeps the other rows). Runs: {when}, {seconds // 60} min "
        f"{seconds % 60} s of benches in all. Per-bench JSON: [`bench-results.json`](bench-results.json).\n\n"
        f"{table(results)}\n{END}"
    )
    head, rest = page.split(START, 1)
    PAGE.write_text(head + block + rest.split(END, 1)[1])


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Bars of how far rpcmesh is ahead of its peer (or goal): right of 1 ahead, left behind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels: list[str] = []
    scores: list[float] = []
    for bench in BENCHES:
        figures = results.get(bench.id, {})
        for figure in bench.figures:
            row = evaluate(figure, figures)
            if row is None or not row["score"]:
                continue
            against = f"vs {figure.peer or bench.peer}" if figure.peer_key else "vs goal"
            label = figure.label if len(figure.label) <= 48 else figure.label[:47] + "…"
            labels.append(f"{bench.title or bench.id}: {label} ({against})")
            scores.append(row["score"])
    if not labels:
        return
    fig, ax = plt.subplots(figsize=(13, 0.3 * len(labels) + 1.6))
    ax.barh(labels, scores, color=["tab:green" if s >= 1 else "tab:red" for s in scores])
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("rpcmesh ÷ peer (or ÷ goal), oriented so that right of 1 = ahead; log scale", fontsize=9)
    ax.set_title(
        f"rpcmesh vs its peers, {time.strftime('%Y-%m-%d', time.gmtime())} (loaded 2-core machine)",
        fontsize=10,
    )
    ax.tick_params(axis="y", labelsize=8)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=[b.id for b in BENCHES], help="run only these")
    parser.add_argument("--plot-only", action="store_true", help="redraw the table and plot from the results")
    parser.add_argument("--no-page", action="store_true", help="leave docs/benchmarks.md alone")
    args = parser.parse_args()
    results: dict[str, dict[str, Any]] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results = {key: value for key, value in results.items() if key in {b.id for b in BENCHES}}
    if not args.plot_only:
        for bench in BENCHES:
            if args.only and bench.id not in args.only:
                continue
            print(
                f"running {bench.id}: {bench.script} {' '.join(bench.args)} ...", file=sys.stderr, flush=True
            )
            results[bench.id] = run_bench(bench) | {
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            }
            RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    if not args.no_page:
        write_page(results)
    plot(results, PLOT)
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    main()
