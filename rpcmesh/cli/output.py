"""CLI output: aligned tables on a terminal, tab-separated lines when piped, JSON on request."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.message import Message


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, tty: bool) -> str:
    """Format rows: padded columns with a header for people, plain TSV for pipes."""
    cells = [[str(cell) for cell in row] for row in rows]
    if not tty:
        return "".join("\t".join(row) + "\n" for row in cells)
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines) + "\n"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], out: TextIO | None = None) -> None:
    """Print a table to out (stdout), choosing the format by whether it is a terminal."""
    stream = out or sys.stdout
    stream.write(render_table(headers, rows, tty=stream.isatty()))
    stream.flush()


def message_to_dict(message: Message) -> dict[str, Any]:
    """A protobuf message as JSON-ready dict with proto field names."""
    result: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return result


def print_json(value: object, out: TextIO | None = None) -> None:
    """Print one JSON document (messages are converted) on one line."""
    stream = out or sys.stdout
    if isinstance(value, Message):
        value = message_to_dict(value)
    stream.write(json.dumps(value, sort_keys=True) + "\n")
    stream.flush()
