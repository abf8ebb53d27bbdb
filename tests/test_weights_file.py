"""The safetensors check of a weight update (opd_teacher.weights_file), on hand-made files: every way a
body can be malformed is refused with a message naming the tensor or the byte counts."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save

from opd_client.errors import InvalidRequest
from opd_teacher.weights_file import read_header


def raw_file(tmp_path, header: dict, data: bytes):
    text = json.dumps(header).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def test_a_real_file_lists_its_tensors(tmp_path):
    path = tmp_path / "ok.safetensors"
    path.write_bytes(save({"b": torch.zeros(2, 3), "a": torch.ones(4, dtype=torch.bfloat16)}))
    entries = {e.name: e for e in read_header(path)}
    assert (entries["b"].dtype, entries["b"].shape, entries["b"].nbytes) == ("F32", (2, 3), 24)
    assert (entries["a"].dtype, entries["a"].shape, entries["a"].nbytes) == ("BF16", (4,), 8)


@pytest.mark.parametrize(
    "header, data, phrase",
    [
        (
            {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            b"\0" * 6,
            "truncated: its tensors need 8",
        ),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 9, "1 bytes after its last"),
        ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12 bytes"),
        ({"x": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "not a safetensors dtype"),
        ({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "sizes >= 0"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "0 <= start <= end"),
        (
            {
                "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "'y' starts at byte 4 of the data and overlaps",
        ),
        (
            {
                "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "y": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
            },
            b"\0" * 12,
            "leaves a gap",
        ),
        ({"__metadata__": {"format": "pt"}}, b"", "holds no tensors"),
        ({"x": [1, 2]}, b"", "must be an object"),
    ],
)
def test_malformed_files_are_refused_by_name(tmp_path, header, data, phrase):
    with pytest.raises(InvalidRequest) as refused:
        read_header(raw_file(tmp_path, header, data))
    assert phrase in refused.value.message and refused.value.field == "body"


def test_a_cut_header_and_a_non_json_header(tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(struct.pack("<Q", 100) + b'{"x": ')
    with pytest.raises(InvalidRequest, match="header claims 100 bytes, the body holds 6"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}")
    with pytest.raises(InvalidRequest, match="not JSON"):
        read_header(path, field="data")
    path.write_bytes(b"\x01")
    with pytest.raises(InvalidRequest, match="1 bytes: too short"):
        read_header(path)
