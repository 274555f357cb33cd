"""AMQP header values nested too deep to unpack, carried as their exact wire bytes.

A header frame fits in the connection's frame_max (RabbitMQ's default: 131,072 bytes), and a
table or array inside another costs 5 or 6 bytes: a frame can nest 26,000 levels. pamqp
decodes a level with two Python calls that each copy the rest of the frame, so at that depth
it would need a recursion limit of 52,000 and about 3 GB of memory (measured, see
docs/operations.md "Poison and hostile input"); and a structure that deep breaks whatever
recurses in C (orjson stops at 254 levels, `repr` and `==` could overflow the C stack). So
consumer/amqptables.py has pamqp unpack tables and arrays only to `MAX_DEPTH` levels; a table
or array below that stays one `DeepValue`: its bytes as they came, re-encoded verbatim when a
copy is published, exported as `{"$amqp": base64}`. Nothing of ours reads a header that deep.

A leaf, free of pamqp, so that the pure export format can name the type too.
"""

from __future__ import annotations

from dataclasses import dataclass

# Tables and arrays unpacked, counting the headers table itself. Ours and the broker's need 4
# (headers, x-death, a death, its routing-keys). The bound keeps every recursion over headers
# short: the export nests at most 2 JSON levels per level ({"$table": …}) plus 3, within
# orjson's 254.
MAX_DEPTH = 64

# Field value types of a fixed size: the bytes that follow the type byte.
_FIXED = {
    b"t": 1,
    b"b": 1,
    b"B": 1,
    b"s": 2,
    b"u": 2,
    b"I": 4,
    b"i": 4,
    b"l": 8,
    b"L": 8,
    b"f": 4,
    b"d": 8,
    b"D": 5,
    b"T": 8,
    b"V": 0,
    b"\x00": 0,
}
_CONTAINERS = (b"F", b"A")  # a table, an array: a 4-byte length, then entries or values
_SIZED = (b"S", b"x")  # a long string, a byte array: a 4-byte length, then the bytes


@dataclass(frozen=True, slots=True, repr=False)
class DeepValue:
    """A table or array left packed: `raw` is its encoding, type byte first (`F` or `A`), and
    `depth` how many tables and arrays nest in it, itself included."""

    raw: bytes
    depth: int

    @classmethod
    def parse(cls, raw: bytes) -> DeepValue:
        """`raw` as a DeepValue; ValueError unless it is exactly one well-formed table or array."""
        return cls(bytes(raw), nesting(raw))

    def __repr__(self) -> str:
        # Short whatever the size: this may end up in a log line or an exception.
        return f"<AMQP value nested {self.depth} deep, {len(self.raw)} bytes, kept packed>"

    __str__ = __repr__


def nesting(raw: bytes) -> int:
    """How deep tables and arrays nest in the one field value `raw` (type byte first); raises
    ValueError unless `raw` is exactly one well-formed table or array. A loop with a stack of
    open containers, never recursion, so any depth is measured in linear time."""
    kind = raw[:1]
    if kind not in _CONTAINERS or len(raw) < 5 or 5 + _length(raw, 1) != len(raw):
        raise ValueError("not one AMQP field table or array")
    open_ends: list[tuple[int, bool]] = [(len(raw), kind == b"F")]  # where each ends; a table?
    position, deepest = 5, 1
    while open_ends:
        end, in_table = open_ends[-1]
        if position == end:
            open_ends.pop()
            continue
        if in_table:  # a key first: its length byte, then the key
            position += 1 + raw[position]
        position = _after_type(raw, position, end, open_ends)
        deepest = max(deepest, len(open_ends))
    return deepest


def _after_type(raw: bytes, position: int, end: int, open_ends: list[tuple[int, bool]]) -> int:
    """Step over the type byte at `position` and the value's own bytes, or open a container
    (pushed on `open_ends`, its contents are next); where reading goes on."""
    if position >= end:
        raise ValueError("an AMQP field table entry runs past its table")
    kind = raw[position : position + 1]
    position += 1
    if kind in _FIXED:
        position += _FIXED[kind]
    elif kind in _SIZED or kind in _CONTAINERS:
        if position + 4 > end:
            raise ValueError("an AMQP field value runs past its container")
        length = _length(raw, position)
        position += 4
        if kind in _CONTAINERS and position + length <= end:
            open_ends.append((position + length, kind == b"F"))
            return position
        position += length
    else:
        raise ValueError(f"unknown AMQP field value type {kind!r}")
    if position > end:
        raise ValueError("an AMQP field value runs past its container")
    return position


def _length(raw: bytes, position: int) -> int:
    return int.from_bytes(raw[position : position + 4], "big")
