"""CLI output: aligned tables on a terminal, tab-separated lines when piped, JSON on request.

Every ``--json`` document is a protobuf message in protobuf's JSON mapping (see docs/cli.md): proto
field names, enums by name, zero values kept, and bytes as base64 except a payload whose message says
it is JSON (``content_type`` ``application/json`` or ``…+json``), which is embedded as JSON.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
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


def is_json_content(content_type: str) -> bool:
    """True for ``application/json`` and ``application/<x>+json`` (parameters such as charset ignored)."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def message_to_dict(message: Message) -> dict[str, Any]:
    """A message as a JSON-ready dict: proto field names, zero values kept, JSON payloads embedded."""
    result: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _embed_json_payloads(message, result)
    return result


def _embed_json_payloads(message: Message, value: dict[str, Any]) -> None:
    """Replace base64 bytes fields by their JSON value where the message's content_type says JSON."""
    descriptor = message.DESCRIPTOR
    content_type = descriptor.fields_by_name.get("content_type")
    json_bytes = (
        content_type is not None
        and content_type.type == FieldDescriptor.TYPE_STRING
        and is_json_content(getattr(message, content_type.name))
    )
    for field in descriptor.fields:
        name = field.name
        if name not in value:
            continue
        if field.type == FieldDescriptor.TYPE_BYTES and json_bytes and not _is_repeated(field):
            raw = getattr(message, name)
            if raw:
                try:
                    value[name] = json.loads(raw)
                except (UnicodeDecodeError, json.JSONDecodeError):
                    value[name] = base64.b64encode(raw).decode()  # not JSON after all: as protobuf has it
            continue
        child_type = field.message_type
        if (
            field.type != FieldDescriptor.TYPE_MESSAGE
            or child_type is None
            or child_type.GetOptions().map_entry
        ):
            continue
        if child_type.full_name.startswith("google.protobuf."):
            continue  # well-known types have their own JSON forms (timestamps, durations)
        if _is_repeated(field):
            for child, child_value in zip(getattr(message, name), value[name], strict=True):
                _embed_json_payloads(child, child_value)
        elif message.HasField(name):
            _embed_json_payloads(getattr(message, name), value[name])


def _is_repeated(field: Any) -> bool:
    return bool(field.is_repeated)


def print_json(value: object, out: TextIO | None = None) -> None:
    """Print one JSON document (messages are converted) on one line."""
    stream = out or sys.stdout
    if isinstance(value, Message):
        value = message_to_dict(value)
    stream.write(json.dumps(value, sort_keys=True) + "\n")
    stream.flush()
