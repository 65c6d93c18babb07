"""JSON records read in bounded memory: a record's text field comes out in pieces.

``json.loads`` needs a whole record in memory (and the string it returns is a second copy); a
record holding one 50 MB document would then cost several times that before tokenizing starts.
This module parses a record from a stream of text blocks and hands the text field on as it is
read, so memory is bounded by the block size whatever a document's length; strings are decoded by
``json``'s own scanner, a read-ahead block at a time. Small records never
come here (``stages/corpus.py`` gives them to ``json.loads``); what this parser accepts matches
``json.loads`` (NaN/Infinity included), and it refuses what the project refuses: a text field
that is not a string, a lone surrogate (not Unicode text), a text field given twice.
"""

from __future__ import annotations

import json
import re
from json.decoder import scanstring
from typing import Callable, Iterator

from pipeline.errors import UserError

PIECE_CHARS = 1 << 20  # the size of the pieces a document's text comes out in
_WS = " \t\n\r"
_SURROGATE = re.compile("[\ud800-\udfff]")
_READ_AHEAD = 1 << 16
_LITERAL = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|true|false|null|NaN|Infinity|-Infinity")
_LOOKAHEAD = 1 << 12  # enough for any literal and for an escape pair
_KINDS = {"{": "an object", "[": "an array", '"': "a string", "t": "a boolean", "f": "a boolean", "n": "null"}

Where = Callable[["Chars"], str]  # names a position for an error ("docs.json line 3 column 7")


class Chars:
    """Text read from blocks with bounded lookahead; knows its line and column for errors."""

    def __init__(self, blocks: Iterator[str], line: int = 1):
        self._blocks = blocks
        self.buf = ""
        self.i = 0
        self.ended = False
        self._line = line  # the line of buf[0]
        self._col0 = 0  # buf index where buf[0]'s line starts (<= 0: before buf)

    def fill(self, n: int) -> bool:
        """Make ``n`` characters available from ``i`` if the stream has them; False at its end."""
        while len(self.buf) - self.i < n and not self.ended:
            block = next(self._blocks, None)
            if block is None:
                self.ended = True
                break
            self._drop()
            self.buf += block
        return len(self.buf) - self.i >= n

    def _drop(self) -> None:
        done = self.buf[:self.i]
        nl = done.count("\n")
        if nl:
            self._line += nl
            self._col0 = done.rfind("\n") + 1 - self.i
        else:
            self._col0 -= self.i
        self.buf = self.buf[self.i:]
        self.i = 0

    def peek(self) -> str:
        return self.buf[self.i] if self.fill(1) else ""

    def position(self) -> tuple[int, int]:
        """(line, column) of the next character, both from 1."""
        head = self.buf[:self.i]
        nl = head.count("\n")
        if nl:
            return self._line + nl, self.i - head.rfind("\n")
        return self._line, self.i - self._col0 + 1

    def skip_ws(self) -> None:
        while self.fill(1):
            j = self.i
            n = len(self.buf)
            while j < n and self.buf[j] in _WS:
                j += 1
            self.i = j
            if j < n:
                return


def _fail(c: Chars, where: Where, msg: str) -> UserError:
    return UserError(f"data.source: {where(c)} is not valid JSON ({msg})")


def _expect(c: Chars, ch: str, where: Where, msg: str) -> None:
    c.skip_ws()
    if c.peek() != ch:
        raise _fail(c, where, msg)
    c.i += 1


def string_parts(c: Chars, where: Where, strict_unicode: bool = False) -> Iterator[str]:
    """The decoded parts of the string whose opening quote was just consumed, as read: each
    part is what ``json``'s own (C) string scanner makes of the read-ahead text up to a cut
    that splits no escape and no surrogate pair."""
    while True:
        c.fill(_READ_AHEAD)
        eof = c.ended  # the buffer holds all the rest
        cut = len(c.buf) if eof else _cut(c.buf, c.i, len(c.buf))
        if cut == c.i:  # nothing safe to cut yet: read further
            c.fill(len(c.buf) - c.i + _READ_AHEAD)
            continue
        try:
            part, end = scanstring(c.buf[c.i:cut] + '"', 0, True)
        except json.JSONDecodeError as err:
            c.i += err.pos
            raise _fail(c, where, err.msg) from None
        closed = end <= cut - c.i
        if closed or not eof:
            bad = _SURROGATE.search(part) if strict_unicode else None
            if bad:
                raise UserError(f"data.source: {where(c)} holds a lone surrogate \\u{ord(bad.group()):04x}, "
                                "which is not Unicode text")
            if part:
                yield part
        if closed:
            c.i += end
            return
        if eof:
            c.i = len(c.buf)
            raise _fail(c, where, "Unterminated string")
        c.i = cut


def _cut(buf: str, lo: int, hi: int) -> int:
    """The largest ``j`` in [lo, hi] where the string text ``buf[lo:]`` (``lo`` at an escape
    boundary) splits no escape and no surrogate pair; ``lo`` when there is none. Every
    backslash is taken for an escape's start: wrong only for the second of ``\\\\``, where
    it moves the cut back one escape more than needed, never onto an escape."""
    j = hi
    while j > lo:
        k = buf.rfind("\\", max(lo, j - 6), j)  # an escape spanning j starts at most 6 before it
        if k == -1:
            return j
        size = 6 if buf[k + 1:k + 2] == "u" else 2
        high = size == 6 and buf[k + 2:k + 4].lower() in ("d8", "d9", "da", "db")
        if k + size < j or (k + size == j and not high):
            return j
        j = k  # before the escape that spans j (or a high surrogate that ends at it)
    return lo


def _key(c: Chars, where: Where) -> str:
    c.skip_ws()
    if c.peek() != '"':
        raise _fail(c, where, "Expecting property name enclosed in double quotes")
    c.i += 1
    return "".join(string_parts(c, where))


def skip_value(c: Chars, where: Where) -> None:
    """Consume one JSON value of any size, checking its grammar, holding none of it."""
    closers: list[str] = []
    while True:
        c.skip_ws()
        ch = c.peek()
        if ch in "{[":
            c.i += 1
            c.skip_ws()
            close = "}" if ch == "{" else "]"
            if c.peek() == close:
                c.i += 1
            else:
                closers.append(close)
                if close == "}":
                    _key(c, where)
                    _expect(c, ":", where, "Expecting ':' delimiter")
                continue
        elif ch == '"':
            c.i += 1
            for _ in string_parts(c, where):
                pass
        else:
            c.fill(_LOOKAHEAD)
            m = _LITERAL.match(c.buf, c.i)
            if m is None:
                raise _fail(c, where, "Expecting value")
            c.i = m.end()
        while closers:  # after a value: a comma, or the end of the innermost container
            c.skip_ws()
            ch = c.peek()
            if ch == closers[-1]:
                c.i += 1
                closers.pop()
            elif ch == ",":
                c.i += 1
                if closers[-1] == "}":
                    _key(c, where)
                    _expect(c, ":", where, "Expecting ':' delimiter")
                break
            else:
                raise _fail(c, where, "Expecting ',' delimiter")
        if not closers:
            return


def more(c: Chars, close: str, where: Where) -> bool:
    """After a member of an object or array: True at a comma (another follows), False at its
    closing bracket, an error at anything else."""
    c.skip_ws()
    ch = c.peek()
    if ch not in (",", close):
        raise _fail(c, where, "Expecting ',' delimiter")
    c.i += 1
    return ch == ","


def _pieces(parts: Iterator[str]) -> Iterator[str]:
    """Parts regrouped into pieces of about ``PIECE_CHARS`` (the tokenizer's unit of work)."""
    held: list[str] = []
    size = 0
    for part in parts:
        held.append(part)
        size += len(part)
        if size >= PIECE_CHARS:
            yield "".join(held)
            held, size = [], 0
    if held:
        yield "".join(held)


def record(c: Chars, field: str, where: Where, drops: dict[str, int]) -> Iterator[Iterator[str]]:
    """Parse one object; yield its ``field`` as a document (an iterator of pieces) when it
    holds text. A null or empty text is counted in ``drops`` and yields nothing. The
    document must be read before this generator is advanced (it is drained if not)."""
    c.skip_ws()
    if c.peek() != "{":
        kind = _KINDS.get(c.peek(), "a number")
        raise UserError(f"data.text_field: '{field}' not found in {where(c)} (it holds {kind}, not an object)")
    c.i += 1
    keys: list[str] = []
    seen = False
    c.skip_ws()
    if c.peek() == "}":
        c.i += 1
    else:
        while True:
            key = _key(c, where)
            _expect(c, ":", where, "Expecting ':' delimiter")
            c.skip_ws()
            if key != field:
                if len(keys) < 20:
                    keys.append(key)
                skip_value(c, where)
            elif seen:
                raise UserError(f"data.text_field: '{field}' appears twice in {where(c)}")
            else:
                seen = True
                yield from _text_value(c, field, where, drops)
            if not more(c, "}", where):
                break
    if not seen:
        raise UserError(f"data.text_field: '{field}' not found in {where(c)} (keys: {', '.join(keys)})")


def _text_value(c: Chars, field: str, where: Where, drops: dict[str, int]) -> Iterator[Iterator[str]]:
    ch = c.peek()
    if ch == '"':
        c.i += 1
        if c.peek() == '"':
            c.i += 1
            drops["empty_text"] = drops.get("empty_text", 0) + 1
            return
        doc = _pieces(string_parts(c, where, strict_unicode=True))
        yield doc
        for _ in doc:  # the reader moved on without reading it all
            pass
        return
    c.fill(4)
    if c.buf.startswith("null", c.i):
        c.i += 4
        drops["null_text"] = drops.get("null_text", 0) + 1
        return
    at = where(c)
    skip_value(c, where)  # not JSON at all is the first thing to say
    raise UserError(f"data.text_field: '{field}' in {at} is not a string (it holds {_KINDS.get(ch, 'a number')})")
