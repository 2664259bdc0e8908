"""Ways to cut a byte stream into chunks, for stream translators that must not care where a read ends."""

from __future__ import annotations

from collections.abc import Callable

Split = Callable[[bytes], list[bytes]]


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


def sized(n: int) -> Split:
    def split(data: bytes) -> list[bytes]:
        return [data[i:i + n] for i in range(0, len(data), n)]
    split.__name__ = f"every_{n}_bytes"
    return split
