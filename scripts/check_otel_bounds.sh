#!/usr/bin/env bash
# Installs rpcmesh into a throwaway venv with the OpenTelemetry packages pinned to the LOWER bounds
# declared in pyproject.toml, then runs the telemetry tests there (tests/unit/telemetry and
# tests/integration/telemetry). The project's own .venv tests the newest releases; this tests the floor.
#
#   scripts/check_otel_bounds.sh            # lower bounds read from pyproject.toml
#   OTEL_BOUNDS_KEEP=1 scripts/check_otel_bounds.sh   # keep the venv (path printed) for a look
#
# Needs network access to the package index (pip's ordinary configuration). Exit status: pip's or pytest's.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/otel-bounds.XXXXXX")"
if [[ -z "${OTEL_BOUNDS_KEEP:-}" ]]; then trap 'rm -rf "$WORK"' EXIT; else echo "venv kept in $WORK/venv"; fi

# The ">=X" of every opentelemetry-* requirement in [project].dependencies, as "name==X".
mapfile -t PINS < <("$PYTHON" - "$ROOT/pyproject.toml" <<'PY'
import re, sys, tomllib
with open(sys.argv[1], "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
for dep in deps:
    m = re.match(r"^(opentelemetry-[a-z0-9-]+)\s*>=\s*([^,;\s]+)", dep)
    if m:
        print(f"{m.group(1)}=={m.group(2)}")
PY
)
if [[ ${#PINS[@]} -eq 0 ]]; then echo "no opentelemetry-* lower bounds found in pyproject.toml" >&2; exit 2; fi
echo "pinning: ${PINS[*]}"

start=$(date +%s)
"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q --disable-pip-version-check -e "$ROOT[dev]" "${PINS[@]}"
"$WORK/venv/bin/pip" list --disable-pip-version-check 2>/dev/null | grep -E '^(opentelemetry|protobuf|grpcio)' || true
# Fail if pip did not honour a pin (e.g. a dependency dragged a package up).
"$WORK/venv/bin/python" - "${PINS[@]}" <<'PY'
import sys
from importlib.metadata import version
bad = [p for p in sys.argv[1:] if version(p.split("==")[0]) != p.split("==")[1]]
if bad:
    sys.exit(f"not installed at the lower bound: {bad}")
PY
installed=$(date +%s)
cd "$ROOT"
"$WORK/venv/bin/python" -m pytest -q -p no:cacheprovider tests/unit/telemetry tests/integration/telemetry "$@"
echo "otel lower bounds OK: install $((installed - start)) s, tests $(($(date +%s) - installed)) s"
