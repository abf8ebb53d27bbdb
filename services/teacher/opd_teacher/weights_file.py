"""The safetensors files of a weight update, checked before a byte of them is used (no torch here).

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
data_offsets: [start, end]}, "__metadata__"?: {...}}, then the tensors' bytes, back to back. A pushed body
is refused with a message naming what is wrong, before anything is staged: too short to hold a header, a
header longer than the body, JSON that is not the format, a dtype or shape that does not add up to its
byte range, ranges that overlap or leave gaps, and a body shorter (truncated) or longer than its tensors.
The safetensors library refuses such files too, but its messages do not say which tensor or how many bytes.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from opd_client.errors import InvalidRequest

# Bytes per element of each safetensors dtype code.
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
# The safetensors library's own bound on the JSON header (its MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors code, e.g. "F32"
    shape: tuple[int, ...]
    start: int  # byte range in the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path, field: str = "body") -> list[TensorEntry]:
    """The tensors of a safetensors file, in file order; an InvalidRequest naming `field` when the file is
    not a well-formed, complete safetensors file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InvalidRequest(
                f"{field} holds {size} bytes: too short for a safetensors file (an 8-byte header length, "
                "the JSON header, the tensors)",
                field=field,
            )
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES:
            raise InvalidRequest(
                f"{field}: the safetensors header claims {header_len} bytes, above the format's limit of "
                f"{MAX_HEADER_BYTES}; not a safetensors file",
                field=field,
            )
        if 8 + header_len > size:
            raise InvalidRequest(
                f"{field} is truncated: its safetensors header claims {header_len} bytes, the body holds "
                f"{size - 8} after the length",
                field=field,
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidRequest(f"{field}: the safetensors header is not JSON: {e}", field=field) from None
    if not isinstance(header, dict):
        raise InvalidRequest(f"{field}: the safetensors header must be a JSON object", field=field)
    entries = [_entry(name, spec, field) for name, spec in header.items() if name != "__metadata__"]
    if not entries:
        raise InvalidRequest(f"{field} holds no tensors; send at least one", field=field)
    data_bytes = size - 8 - header_len
    _check_layout(entries, data_bytes, field)
    return entries


def _entry(name: str, spec: object, field: str) -> TensorEntry:
    where = f"{field}: tensor {name!r}"
    if not isinstance(spec, dict):
        raise InvalidRequest(f"{where}: its header entry must be an object", field=field)
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise InvalidRequest(
            f"{where}: dtype {dtype!r} is not a safetensors dtype ({', '.join(DTYPE_BYTES)})", field=field
        )
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise InvalidRequest(f"{where}: shape {shape!r} must be a list of sizes >= 0", field=field)
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and o >= 0 for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise InvalidRequest(
            f"{where}: data_offsets {offsets!r} must be [start, end], 0 <= start <= end", field=field
        )
    start, end = offsets
    want = math.prod(shape) * DTYPE_BYTES[dtype]
    if end - start != want:
        raise InvalidRequest(
            f"{where}: {dtype} {shape} needs {want} bytes, its data_offsets cover {end - start}", field=field
        )
    return TensorEntry(name, dtype, tuple(shape), start, end)


def _check_layout(entries: list[TensorEntry], data_bytes: int, field: str) -> None:
    """The tensors tile the data section exactly: no gap, no overlap, nothing missing or left over."""
    position = 0
    for e in sorted(entries, key=lambda e: (e.start, e.end)):
        if e.start != position:
            problem = "overlaps the tensor before it" if e.start < position else "leaves a gap before it"
            raise InvalidRequest(
                f"{field}: tensor {e.name!r} starts at byte {e.start} of the data and {problem} (which "
                f"ends at {position})",
                field=field,
            )
        position = e.end
    if position > data_bytes:
        raise InvalidRequest(
            f"{field} is truncated: its tensors need {position} bytes of data, the body holds {data_bytes}",
            field=field,
        )
    if position < data_bytes:
        raise InvalidRequest(
            f"{field} has {data_bytes - position} bytes after its last tensor (the tensors need "
            f"{position}); not a safetensors file as written",
            field=field,
        )
