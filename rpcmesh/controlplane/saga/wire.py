"""Build step requests from PayloadTemplates by copying protobuf fields on the wire.

The coordinator never needs the participants' message descriptors: a field is
found by number in the encoded source, re-tagged with the target number and
appended to the request. Protobuf parsers merge a later occurrence of a field
over an earlier one, so appended fields override the template's base.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

MAX_FIELD_NUMBER = (1 << 29) - 1
_RESERVED = range(19000, 20000)
_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5


class WireError(ValueError):
    """The bytes are not a valid protobuf message (or use groups, which are not supported)."""


def valid_field_number(number: int) -> bool:
    """Field numbers 1..2^29-1 outside the reserved 19000-19999."""
    return 1 <= number <= MAX_FIELD_NUMBER and number not in _RESERVED


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(data):
            raise WireError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 64:
            raise WireError("varint too long")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@dataclass(frozen=True)
class WireField:
    """One encoded field occurrence: its number, wire type and value bytes (after the tag)."""

    number: int
    wire_type: int
    value: bytes


def parse_fields(data: bytes) -> list[WireField]:
    """Split a message into its field occurrences, in order."""
    fields: list[WireField] = []
    pos = 0
    while pos < len(data):
        key, value_start = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if wire_type == _VARINT:
            _, end = _read_varint(data, value_start)
        elif wire_type == _I64:
            end = value_start + 8
        elif wire_type == _I32:
            end = value_start + 4
        elif wire_type == _LEN:
            length, body = _read_varint(data, value_start)
            end = body + length
        elif wire_type in (_SGROUP, _EGROUP):
            raise WireError("groups are not supported")
        else:
            raise WireError(f"unknown wire type {wire_type}")
        if end > len(data):
            raise WireError("truncated field")
        fields.append(WireField(number, wire_type, data[value_start:end]))
        pos = end
    return fields


def encode_field(number: int, wire_type: int, value: bytes) -> bytes:
    """A field occurrence with its tag."""
    return _varint((number << 3) | wire_type) + value


def copy_field(source: bytes, source_field: int, target_field: int) -> bytes:
    """Every occurrence of ``source_field`` in ``source``, re-tagged as ``target_field``."""
    return b"".join(
        encode_field(target_field, f.wire_type, f.value)
        for f in parse_fields(source)
        if f.number == source_field
    )


@dataclass(frozen=True)
class FieldCopy:
    """One FieldMapping as plain values."""

    source: str
    source_field: int
    target_field: int


def build_payload(
    base: bytes, base_from: str, mappings: Sequence[FieldCopy], sources: Mapping[str, bytes]
) -> bytes:
    """Base (or a whole source message), then each mapped field in order.

    Args:
        base: Literal base bytes of the template.
        base_from: When non-empty, the name of the source used as the base instead.
        mappings: Fields to copy.
        sources: ``"input"`` and the results of the steps that succeeded so far.

    Raises:
        KeyError: a named source is not available.
        WireError: a source is not a valid message.
    """
    parts = [sources[base_from] if base_from else base]
    for mapping in mappings:
        parts.append(copy_field(sources[mapping.source], mapping.source_field, mapping.target_field))
    return b"".join(parts)
