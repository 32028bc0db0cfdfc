"""The library's safetensors header reader (used by the workers and the CLI) raises only its own
AdapterError on any header, fuzzed over JSON structures."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from urae.adapters.formats import read_header
from urae.errors import AdapterError, HeaderFormatError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F16", "BF16", "F32", "I64", ""]) | json_values,
        "shape": st.lists(st.integers(-2, 6), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-4, 80), max_size=3) | json_values,
    },
)
headers = st.dictionaries(
    st.sampled_from(["__metadata__", "w"]) | st.text(max_size=10), entries | json_values, max_size=5
) | json_values


def write(path: Path, raw: bytes, data: int) -> Path:
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data)
    return path


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=headers, data=st.integers(0, 96))
def test_any_json_header_is_read_or_refused_with_an_adapter_error(tmp_path: Path, header: Any, data: int) -> None:
    path = write(tmp_path / "x.safetensors", json.dumps(header).encode(), data)
    try:
        read_header(path)
    except AdapterError as exc:
        assert str(path) in str(exc)


@pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"w": 1' + b"1" * 5000 + b"}", b"\xff\xfe{}"])
def test_deep_nesting_huge_numbers_and_bad_text_are_header_errors(tmp_path: Path, raw: bytes) -> None:
    with pytest.raises(HeaderFormatError, match="not valid JSON"):
        read_header(write(tmp_path / "x.safetensors", raw, 0))
