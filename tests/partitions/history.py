"""Operation histories of the partition tests: one JSON object per line, one operation per object.

Every line is an :class:`Op`::

    {"proc": "reg-3", "op": "register", "args": {...}, "invoke": 12.345, "complete": 12.410,
     "outcome": "ok" | "fail" | "unknown", "result": {...}, "error": "CODE: message" | null,
     "node": "10.77.0.31:7000"}

``invoke``/``complete`` are ``time.monotonic()`` seconds (one clock for every process on the
machine, network namespaces included). ``fail`` means the operation certainly did not take effect
(INVALID_ARGUMENT, FAILED_PRECONDITION on a wrong expected revision, NOT_FOUND, ALREADY_EXISTS...),
``unknown`` that it may or may not have (timeouts, UNAVAILABLE, cancellation). The nemesis writes
its faults in the same format (proc ``nemesis``, op ``fault``/``heal``). :class:`HistoryWriter`
appends lines from many asyncio tasks (each line is written whole, flushed at once so a killed
workload loses at most the line being written); :func:`load` reads every ``*.jsonl`` of a folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc

__all__ = [
    "DEFINITE_FAILURES",
    "FAIL",
    "OK",
    "UNKNOWN",
    "HistoryWriter",
    "Op",
    "classify",
    "load",
    "load_final",
]

OK = "ok"
FAIL = "fail"
UNKNOWN = "unknown"

DEFINITE_FAILURES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
"""Status codes after which an operation certainly did not take effect."""


@dataclass
class Op:
    """One recorded operation (or nemesis event)."""

    proc: str
    op: str
    invoke: float
    complete: float
    outcome: str = OK
    args: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    node: str | None = None

    @property
    def ok(self) -> bool:
        """True when the operation is known to have taken effect."""
        return self.outcome == OK

    @property
    def code(self) -> str | None:
        """The status code name of the error ("NOT_FOUND"), None without an error."""
        return None if self.error is None else self.error.split(":", 1)[0]

    def to_json(self) -> str:
        """One line of the history file."""
        return json.dumps(
            {
                "proc": self.proc,
                "op": self.op,
                "args": self.args,
                "invoke": round(self.invoke, 6),
                "complete": round(self.complete, 6),
                "outcome": self.outcome,
                "result": self.result,
                "error": self.error,
                "node": self.node,
            },
            separators=(",", ":"),
            sort_keys=True,
        )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Op:
        """Parse one history line (already decoded)."""
        return cls(
            proc=str(raw["proc"]),
            op=str(raw["op"]),
            invoke=float(raw["invoke"]),
            complete=float(raw.get("complete", raw["invoke"])),
            outcome=str(raw.get("outcome", OK)),
            args=dict(raw.get("args") or {}),
            result=dict(raw.get("result") or {}),
            error=raw.get("error"),
            node=raw.get("node"),
        )


def classify(error: BaseException) -> tuple[str, str]:
    """(outcome, "CODE: message") for an exception an operation raised."""
    if isinstance(error, grpc.aio.AioRpcError | grpc.RpcError):
        code = error.code()
        details = error.details()
        status = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
        outcome = FAIL if status in DEFINITE_FAILURES else UNKNOWN
        return outcome, f"{status.name}: {details}"
    if isinstance(error, TimeoutError):
        return UNKNOWN, "DEADLINE_EXCEEDED: client timeout"
    return UNKNOWN, f"UNKNOWN: {type(error).__name__}: {error}"


class HistoryWriter:
    """Appends operations to a JSONL file; safe to share between the asyncio tasks of one process."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: IO[str] | None = path.open("a", encoding="utf-8")
        self.count = 0

    def write(self, op: Op) -> Op:
        """Append ``op`` as one line (a single write call, flushed: lines never interleave)."""
        if self._file is not None:
            self._file.write(op.to_json() + "\n")
            self._file.flush()
            self.count += 1
        return op

    def record(
        self,
        proc: str,
        op: str,
        invoke: float,
        *,
        outcome: str = OK,
        args: Mapping[str, Any] | None = None,
        result: Mapping[str, Any] | None = None,
        error: str | None = None,
        node: str | None = None,
        complete: float | None = None,
    ) -> Op:
        """Build an :class:`Op` completed now (or at ``complete``) and append it."""
        return self.write(
            Op(
                proc=proc,
                op=op,
                invoke=invoke,
                complete=time.monotonic() if complete is None else complete,
                outcome=outcome,
                args=dict(args or {}),
                result=dict(result or {}),
                error=error,
                node=node,
            )
        )

    def close(self) -> None:
        """Flush and close the file (later writes are dropped)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def _lines(path: Path) -> Iterator[Op]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a killed writer may be cut short
            yield Op.from_dict(raw)


def load(paths: Path | Iterable[Path]) -> list[Op]:
    """Every operation in a folder's ``*.jsonl`` files (or the given files), ordered by invoke time."""
    if isinstance(paths, Path):
        files = sorted(paths.glob("*.jsonl")) if paths.is_dir() else [paths]
    else:
        files = list(paths)
    ops = [op for path in files for op in _lines(path)]
    ops.sort(key=lambda op: (op.invoke, op.complete))
    return ops


def load_final(folder: Path) -> dict[str, Any]:
    """The final read phase's ``final.json`` of ``folder`` ({} when there is none)."""
    path = folder / "final.json"
    if not path.exists():
        return {}
    loaded = json.loads(path.read_text(encoding="utf-8"))
    return loaded if isinstance(loaded, dict) else {}
