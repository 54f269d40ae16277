"""Read the top-level arrays of a large JSON object one element at a time.

COCO's instances_train2014.json is ~330 MB; ``json.load`` of it holds every polygon as Python
objects at once (several GB). :func:`iter_top_level` reads the file in chunks and decodes one
element of ``images`` / ``annotations`` / ... at a time with the standard library's decoder
(``json.JSONDecoder.raw_decode``, the C scanner), so that memory holds one chunk and one element
whatever the file's size. Each element comes with its exact source text, to be stored as it is.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data.errors import DataError

CHUNK = 1 << 20
MAX_ELEMENT = 256 << 20  # a single element larger than this is refused, not buffered without end
_DECODER = json.JSONDecoder()
_SPACE = " \t\r\n"
_NUMBER = frozenset("0123456789+-.eE")


class _Stream:
    def __init__(self, path: Path, chunk: int):
        self.path, self.chunk = path, chunk
        self.handle = open(path, encoding="utf-8")
        self.buf, self.pos, self.consumed, self.eof = "", 0, 0, False

    def close(self) -> None:
        self.handle.close()

    def fill(self) -> bool:
        """Append the next chunk (dropping what was read); False at the end of the file."""
        try:
            data = self.handle.read(self.chunk)
        except UnicodeDecodeError as error:
            raise DataError(
                f"{self.path}: not UTF-8 text near character {self.consumed + len(self.buf)} ({error.reason})"
            ) from None
        if not data:
            self.eof = True
            return False
        if not self.consumed and not self.buf and data.startswith("\ufeff"):
            data = data[1:]
        self.consumed += self.pos
        self.buf = self.buf[self.pos :] + data
        self.pos = 0
        return True

    def peek(self) -> str:
        """The next character that is not white space ('' at the end of the file)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _SPACE:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.fill():
                return ""

    def expect(self, char: str, what: str) -> None:
        found = self.peek()
        if found != char:
            raise self.error(f"expected {what}, found {found!r}" if found else f"expected {what}, the file ends")
        self.pos += 1

    def value(self) -> tuple[Any, str]:
        """The next JSON value and its text."""
        self.peek()
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as error:
                if self.eof or len(self.buf) - self.pos > MAX_ELEMENT or _not_cut_short(error, len(self.buf)):
                    raise self.error(error.msg, self.consumed + error.pos) from None
                self.fill()
                continue
            if not self.eof and _may_go_on(self.buf, end) and self.fill():
                continue  # a number at the end of the chunk may go on in the next one
            text = self.buf[self.pos : end]
            self.pos = end
            return value, text

    def error(self, message: str, at: int | None = None) -> DataError:
        where = self.consumed + self.pos if at is None else at
        return DataError(f"{self.path}: not valid JSON at character {where}: {message}")


def _may_go_on(text: str, end: int) -> bool:
    """Whether the value that ends at ``end`` may be cut short: only number characters follow it
    up to the end of the text read so far ("2.5e" reads as 2.5 until "10" arrives)."""
    return all(c in _NUMBER for c in text[end:])


def _not_cut_short(error: json.JSONDecodeError, end: int) -> bool:
    """An error well before the end of the text read so far is in the file, not in where the chunk
    ends (an unterminated string is reported at its start, so it always reads more)."""
    return error.pos < end - 16 and not error.msg.startswith("Unterminated string")


def iter_top_level(
    path: str | Path, arrays: set[str], chunk: int = CHUNK, keys: set[str] | None = None
) -> Iterator[tuple[str, Any, str]]:
    """(key, element, element text) for every element of the top-level arrays named in ``arrays``,
    and (key, value, text) for every other top-level key, in file order; ``keys``, when given,
    receives every top-level key met (an empty array yields nothing). DataError naming the file
    and the character position where the text is not JSON or not an object."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    stream = _Stream(path, chunk)
    try:
        stream.expect("{", "a JSON object")
        if stream.peek() == "}":
            stream.pos += 1
            return
        while True:
            key, _ = stream.value()
            if not isinstance(key, str):
                raise stream.error(f"expected a key, found {key!r}")
            stream.expect(":", "':' after a key")
            if keys is not None:
                keys.add(key)
            if key in arrays and stream.peek() == "[":
                yield from _array(stream, key)
            else:
                value, text = stream.value()
                yield key, value, text
            if stream.peek() == ",":
                stream.pos += 1
                continue
            stream.expect("}", "',' or '}' after a value")
            break
        if stream.peek():
            raise stream.error("text after the top-level object")
    finally:
        stream.close()


def _array(stream: _Stream, key: str) -> Iterator[tuple[str, Any, str]]:
    stream.expect("[", "'['")
    if stream.peek() == "]":
        stream.pos += 1
        return
    while True:
        value, text = stream.value()
        yield key, value, text
        if stream.peek() == ",":
            stream.pos += 1
            continue
        stream.expect("]", f"',' or ']' in the {key!r} array")
        return
