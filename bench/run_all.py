"""`make bench`: run every benchmark, keep their JSON lines, and plot the ratios against their goals.

Each bench script ends by printing one JSON line of figures; this runner
collects them into ``docs/bench-results.json`` and draws
``docs/benchmarks.png`` (figure ÷ goal per benchmark: bars at or above the
line meet their goal). Ends by printing one JSON line of every figure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHES = ["bench_client.py", "bench_tracing.py", "bench_registry.py", "bench_bus.py", "bench_saga.py"]
# Arguments beyond a script's defaults: the tracing bench also measures its propagation floor.
ARGUMENTS = {"bench_tracing.py": ["--floor"]}

# (bench, key, goal, higher_is_better)
GOALS = [
    ("bench_client.py", "throughput_ratio", 0.90, True),
    ("bench_client.py", "p50_ratio", 1.10, False),
    ("bench_tracing.py", "tracing_throughput_ratio", 0.90, True),
    ("bench_client.py", "mesh_tracing_throughput_ratio", 0.90, True),
    ("bench_registry.py", "resolve_p99_ms", 5.0, False),
    ("bench_registry.py", "watch_p99_ms", 50.0, False),
    ("bench_registry.py", "rss_mb", 200.0, False),
    ("bench_bus.py", "publish_ratio", 1.0, True),
    ("bench_bus.py", "deliver_ratio", 1.0, True),
    ("bench_bus.py", "p99_ms_at_1k", 20.0, False),
    ("bench_saga.py", "sagas_per_s", 300.0, True),
    ("bench_saga.py", "p50_ratio", 2.0, False),
    ("bench_saga.py", "append_events_per_s", 10_000.0, True),
]


def run_bench(name: str) -> dict[str, object]:
    """Run one bench script; its last stdout line is its JSON figures."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / name), *ARGUMENTS.get(name, [])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        return {
            "error": (result.stderr or result.stdout)[-500:],
            "seconds": round(time.monotonic() - started),
        }
    figures: dict[str, object] = json.loads(lines[-1])
    figures["seconds"] = round(time.monotonic() - started)
    return figures


def plot(results: dict[str, dict[str, object]], path: Path) -> None:
    """Bar chart of how far each figure is from its goal (1.0 = exactly the goal)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels: list[str] = []
    scores: list[float] = []
    for bench, key, goal, higher in GOALS:
        value = results.get(bench, {}).get(key)
        if not isinstance(value, int | float) or value <= 0:
            continue
        labels.append(f"{bench.removeprefix('bench_').removesuffix('.py')}: {key}")
        scores.append(value / goal if higher else goal / value)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(labels) + 1.5))
    colors = ["tab:green" if s >= 1 else "tab:red" for s in scores]
    ax.barh(labels, scores, color=colors)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("figure relative to its goal, log scale (right of the line: goal met)")
    ax.set_title(f"rpcmesh benchmarks, {time.strftime('%Y-%m-%d')}")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="run only these bench scripts")
    parser.add_argument("--plot-only", action="store_true", help="replot docs/bench-results.json")
    args = parser.parse_args()
    results_path = ROOT / "docs" / "bench-results.json"
    if args.plot_only:
        results = json.loads(results_path.read_text())
    else:
        results = {}
        for name in args.only or BENCHES:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            results[name] = run_bench(name)
        results_path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    plot(results, ROOT / "docs" / "benchmarks.png")
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    main()
