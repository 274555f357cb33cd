"""pamqp's field-table codec, bounded in depth: headers nested deeper than `MAX_DEPTH` tables
or arrays stay packed as one `DeepValue` (consumer/nesting.py says why), and a DeepValue is
encoded as the bytes it came as.

Without this, aiormq's frame reader stops at pamqp's RecursionError on a header nested a few
hundred deep, closes the connection, and the message comes back to stop the next reader too: the
worker reconnects in a loop and every `vercel-consumer dlq` command fails at it. With it, such a
message is decoded like any other, in linear time and without recursion deeper than
`MAX_DEPTH`.

`install` changes pamqp for the whole process, so only entry points call it (consumer/cli.py's
`main`; the tests' conftest for the workers they run in-process). It is idempotent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pamqp.decode
import pamqp.encode

from consumer.nesting import MAX_DEPTH, DeepValue

Decoder = Callable[[bytes], tuple[int, Any]]

# How many tables and arrays the current decode is inside. Per thread: decoding is synchronous,
# but a dlq command or a test may decode in more than one thread.
_nesting = threading.local()
_installing = threading.Lock()
_installed: list[bool] = []


def install() -> None:
    """Bound pamqp's table and array decoding at `MAX_DEPTH` and teach its encoder DeepValue."""
    with _installing:
        if _installed:
            return
        _installed.append(True)
        for kind, name in ((b"F", "table"), (b"A", "array")):
            bounded = _bounded(kind, getattr(pamqp.decode, f"field_{name}"))
            # pamqp reaches its decoders through all three: properties by type name, nested
            # values by type byte, and callers by the module's attribute.
            setattr(pamqp.decode, f"field_{name}", bounded)
            pamqp.decode.METHODS[name] = bounded
            pamqp.decode.TABLE_MAPPING[kind] = bounded
        pamqp.encode.encode_table_value = _Encoder(pamqp.encode.encode_table_value)


def _bounded(kind: bytes, decode: Decoder) -> Decoder:
    def decode_bounded(value: bytes) -> tuple[int, Any]:
        depth = getattr(_nesting, "depth", 0)
        if depth >= MAX_DEPTH:
            return _packed(kind, value)
        _nesting.depth = depth + 1
        try:
            return decode(value)
        finally:
            _nesting.depth = depth

    return decode_bounded


def _packed(kind: bytes, value: bytes) -> tuple[int, DeepValue]:
    """The table or array at the start of `value` (after its type byte), left packed."""
    length = int.from_bytes(value[:4], "big")
    if len(value) < 4 or 4 + length > len(value):
        raise ValueError("Field table or array length exceeds available data")
    return 4 + length, DeepValue.parse(kind + value[: 4 + length])


class _Encoder:
    """pamqp's `encode_table_value`, with a DeepValue written as the bytes it came as."""

    def __init__(self, encode: Callable[[Any], bytes]) -> None:
        self._encode = encode

    def __call__(self, value: Any) -> bytes:
        if isinstance(value, DeepValue):
            return value.raw
        return self._encode(value)
