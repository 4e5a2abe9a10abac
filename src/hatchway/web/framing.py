"""Response framing for the web proxy: where each upstream response starts and ends.

Each browser connection is pinned to one upstream byte stream. ``ResponseFramer`` reads
the responses on that stream without decoding them: it checks every head whole, reads
the fields that decide framing (a hook that rewrites heads gets the others parsed on
demand) and scans chunked bodies, but body bytes
go out as slices of the data fed in, byte for byte (no re-chunking). Framing follows
RFC 9112 §6.3. Sans-I/O: ``expect()`` per request sent upstream, ``feed()`` the bytes
that come back, write what it returns to the browser.

    HatchwayError
    └── ResponseError       the upstream sent a malformed or unexpected response

A ``ResponseError`` carries in ``pieces`` what ``feed()`` had produced before the fault
(write it, then abort the connection); the framer is then broken for good.
"""

from __future__ import annotations

import enum
import functools
import re
from collections import deque
from collections.abc import Callable
from typing import NoReturn

from hatchway.errors import HatchwayError

__all__ = ["ResponseError", "ResponseFramer", "ResponseHead", "Rewrite"]

HTTP_10 = b"HTTP/1.0"
HTTP_11 = b"HTTP/1.1"
#: The largest chunk-size line, extensions and line ending included.
MAX_CHUNK_LINE = 4 * 1024
MAX_CONTENT_LENGTH = 2**63 - 1
#: Body slices up to this size are copied (cheaper than a memoryview); larger ones are not.
_COPY_MAX = 512

_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([^\r\n\x00]*))?\r?\n")
# One match per well-formed field line; a line that does not match makes the count short.
# The possessive `*+` keeps a long run of blanks from backtracking quadratically.
_FIELD_LINES = re.compile(
    rb"^([" + _TCHAR + rb"]+):[ \t]*+((?:[^\r\n\x00]*[^\r\n\x00 \t])?)[ \t]*\r?\n",
    re.MULTILINE,
)
# A whole head, checked in one pass: what _FIELD_LINES finds line by line, and nothing
# else. Its fields are found only when something asks for them (``ResponseHead.headers``).
_WHOLE_HEAD = re.compile(
    rb"HTTP/1\.([01]) ([0-9]{3})(?: ([^\r\n\x00]*+))?\r?\n"
    rb"(?:[" + _TCHAR + rb"]++:[^\r\n\x00]*+\r?\n)*+\r?\n"
)
# The fields that decide framing, in a lowered head that passed _WHOLE_HEAD.
_FRAMING_NAMES = (b"content-length", b"transfer-encoding", b"connection")


@functools.cache
def _fields_pattern(watched: frozenset[bytes]) -> re.Pattern[bytes]:
    """The framing fields and the watched ones, found in one pass over a lowered head."""
    names = b"|".join(re.escape(name) for name in (*_FRAMING_NAMES, *sorted(watched)))
    return re.compile(rb"\n(" + names + rb"):([^\n]*)")


_FRAMING_FIELDS = _fields_pattern(frozenset())
_FIELD_LINE = re.compile(rb"[" + _TCHAR + rb"]+:[^\r\n\x00]*\r?\n")
_TOKEN = re.compile(rb"[" + _TCHAR + rb"]+")
_CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n\x00]*)?\r?\n")
_BAD_VALUE = re.compile(rb"[\r\n\x00]")


class ResponseError(HatchwayError):
    """The upstream sent a malformed or unexpected response; the message says what."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        #: Output ``feed()`` produced before it found the fault, to write before aborting.
        self.pieces: list[bytes | memoryview] = []


class ResponseHead:
    """A parsed response head. ``raw`` is exactly what was received, empty line included.

    ``headers`` (name, value) in order, values without surrounding blanks: parsed from
    ``raw`` on first use (a head that only passes through never needs them), or given.
    """

    __slots__ = ("_headers", "_lower", "plain", "raw", "reason", "status", "version")

    def __init__(
        self,
        version: bytes,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]] | None,
        raw: bytes,
    ) -> None:
        self.version = version
        self.status = status
        self.reason = reason
        self._headers = headers
        self._lower: bytes | None = None
        self.raw = raw
        #: Whether the framer, told to watch some fields, found none of them (True) or
        #: one at least (False); None when it did not look (its general path).
        self.plain: bool | None = None

    def __repr__(self) -> str:
        return f"ResponseHead({self.version!r}, {self.status}, {self.reason!r}, {self.headers!r})"

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = self._headers
        if headers is None:
            # ``raw`` passed _WHOLE_HEAD: every line after the status line is a field.
            headers = self._headers = _FIELD_LINES.findall(self.raw, self.raw.find(b"\n") + 1)
        return headers

    @headers.setter
    def headers(self, headers: list[tuple[bytes, bytes]]) -> None:
        self._headers = headers

    @property
    def lower(self) -> bytes:
        """``raw`` in lower case (computed once)."""
        lower = self._lower
        if lower is None:
            lower = self._lower = self.raw.lower()
        return lower

    def get(self, name: bytes) -> bytes | None:
        """The value of the first field called ``name`` (any case), or None."""
        name = name.lower()
        for field, value in self.headers:
            if field.lower() == name:
                return value
        return None

    def get_all(self, name: bytes) -> list[bytes]:
        name = name.lower()
        return [value for field, value in self.headers if field.lower() == name]

    def serialize(self) -> bytes:
        """The head with CRLF line endings; raises ValueError rather than emit a bad one."""
        if self.version not in (HTTP_10, HTTP_11) or not 100 <= self.status <= 999:
            raise ValueError(f"bad status line {self.version!r} {self.status}")
        if _BAD_VALUE.search(self.reason):
            raise ValueError(f"bad reason phrase {self.reason!r}")
        parts = [self.version, b" %d " % self.status, self.reason, b"\r\n"]
        for name, value in self.headers:
            if _TOKEN.fullmatch(name) is None or _BAD_VALUE.search(value):
                raise ValueError(f"bad header field {name!r}: {value!r}")
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)


#: Called with every parsed head (interim ones too): None keeps ``raw``, bytes replace it.
Rewrite = Callable[[ResponseHead], bytes | None]


class _State(enum.Enum):
    HEAD = enum.auto()  # between responses, or inside a head
    BODY_LENGTH = enum.auto()
    CHUNK_SIZE = enum.auto()
    CHUNK_DATA = enum.auto()
    CHUNK_CR = enum.auto()  # after chunk data: CR LF (or a bare LF)
    CHUNK_LF = enum.auto()
    TRAILERS = enum.auto()
    BODY_CLOSE = enum.auto()  # body delimited by the end of the stream
    UPGRADED = enum.auto()  # after a 101: raw bytes
    DONE = enum.auto()  # a response that closes the connection has ended


_HEAD = _State.HEAD
_BODY_LENGTH = _State.BODY_LENGTH
_CHUNK_SIZE = _State.CHUNK_SIZE
_CHUNK_DATA = _State.CHUNK_DATA
_CHUNK_CR = _State.CHUNK_CR
_CHUNK_LF = _State.CHUNK_LF
_TRAILERS = _State.TRAILERS
_BODY_CLOSE = _State.BODY_CLOSE
_UPGRADED = _State.UPGRADED
_DONE = _State.DONE


class ResponseFramer:
    """Finds the responses in one upstream byte stream and passes them through.

    ``feed()`` returns the pieces to write to the client: runs of the input as
    ``bytes`` or ``memoryview`` slices, and heads that ``rewrite`` replaced. Only a
    head that spans two feeds, or that is rewritten, is held back until it is whole.
    """

    __slots__ = (
        "_eof",
        "_error",
        "_expected",
        "_fields",
        "_head_buf",
        "_line_buf",
        "_max_head",
        "_max_headers",
        "_must_close",
        "_out",
        "_remaining",
        "_responses",
        "_rewrite",
        "_run",
        "_state",
        "_trailer_size",
        "_watched",
    )

    def __init__(
        self,
        rewrite: Rewrite | None = None,
        *,
        max_head: int = 64 * 1024,
        max_headers: int = 200,
        watch: frozenset[bytes] = frozenset(),
    ) -> None:
        """``watch``: lower-case field names whose presence the rewrite hook cares about;
        a head the one-pass path reads comes with ``plain`` set when it has none."""
        if max_head < 64 or max_headers < 0:
            raise ValueError("max_head must be at least 64 and max_headers not negative")
        self._rewrite = rewrite
        self._watched = watch
        self._fields = _fields_pattern(watch)
        self._max_head = max_head
        self._max_headers = max_headers
        # (request was HEAD, request asked for an upgrade), oldest first.
        self._expected: deque[tuple[bool, bool]] = deque()
        self._state = _HEAD
        self._remaining = 0  # bytes left in a Content-Length body or a chunk
        self._head_buf = bytearray()  # a head that spans feeds
        self._line_buf = bytearray()  # a chunk-size or trailer line that spans feeds
        self._trailer_size = 0
        self._must_close = False
        self._responses = 0
        self._error: str | None = None
        self._eof = False
        # Within one feed(): the output so far, and where the current pass-through run
        # of the input began.
        self._out: list[bytes | memoryview] = []
        self._run = 0

    def detach(self) -> None:
        """Forget the rewrite hook: its owner is done with this framer (and the hook,
        often a bound method of the owner, no longer keeps the two alive in a cycle)."""
        self._rewrite = None

    # --- public state -----------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Requests expected but not yet completely answered."""
        return len(self._expected)

    @property
    def in_message(self) -> bool:
        """A response head or body is in progress."""
        state = self._state
        if state is _HEAD:
            return bool(self._head_buf)
        return state is not _UPGRADED and state is not _DONE

    @property
    def upgraded(self) -> bool:
        """A 101 answered an upgrade request: everything after it passes through raw."""
        return self._state is _UPGRADED

    @property
    def must_close(self) -> bool:
        """After the current (or last) response the connection must be closed."""
        return self._must_close

    @property
    def responses(self) -> int:
        """Complete final responses so far (a 101 counts, other 1xx do not)."""
        return self._responses

    # --- input ------------------------------------------------------------------------

    def expect(self, method: bytes, *, upgrade: bool = False) -> None:
        """Note a request sent upstream; call once per request, in order."""
        self._expected.append((method == b"HEAD", upgrade))

    def feed(self, data: bytes) -> list[bytes | memoryview]:
        """Take bytes from upstream; return the pieces to write to the client, in order."""
        if self._error is not None:
            raise ResponseError(f"the response stream is already broken: {self._error}")
        if self._eof:
            raise ResponseError("data fed after the end of the stream")
        if self._state is _UPGRADED:
            return [data] if data else []
        if self._state is _HEAD and not self._head_buf:
            fast = self._feed_one(data)
            if fast is not None:
                return fast
        out: list[bytes | memoryview] = []
        self._out = out
        self._run = 0
        pos = 0
        end = len(data)
        try:
            while pos < end:
                state = self._state
                if state is _HEAD:
                    pos = self._read_head(data, pos)
                elif state is _BODY_LENGTH or state is _CHUNK_DATA:
                    remaining = self._remaining
                    if end - pos < remaining:
                        self._remaining = remaining - (end - pos)
                        pos = end
                    else:
                        pos += remaining
                        self._remaining = 0
                        if state is _CHUNK_DATA:
                            self._state = _CHUNK_CR
                        else:
                            self._complete()
                elif state is _CHUNK_SIZE:
                    pos = self._read_chunk_size(data, pos)
                elif state is _CHUNK_CR:
                    byte = data[pos]
                    if byte == 0x0D:
                        self._state = _CHUNK_LF
                    elif byte == 0x0A:
                        self._state = _CHUNK_SIZE
                    else:
                        raise ResponseError("chunk data not followed by CRLF")
                    pos += 1
                elif state is _CHUNK_LF:
                    if data[pos] != 0x0A:
                        raise ResponseError("chunk data not followed by CRLF")
                    self._state = _CHUNK_SIZE
                    pos += 1
                elif state is _TRAILERS:
                    pos = self._read_trailer(data, pos)
                elif state is _BODY_CLOSE or state is _UPGRADED:
                    pos = end
                else:  # _DONE
                    raise ResponseError("data after a response that closes the connection")
            self._flush(data, end)
        except ResponseError as exc:
            self._error = str(exc)
            self._flush(data, pos)
            exc.pieces = out
            raise
        finally:
            self._out = []
        return out

    def _feed_one(self, data: bytes) -> list[bytes | memoryview] | None:
        """The common case in one pass: ``data`` begins with a whole head of a response
        to a plain request, framed by one Content-Length, and holds no more than it. None
        (and nothing changed) for anything else: ``feed`` then takes its general path,
        which decides the same for what this accepts."""
        expected = self._expected
        if not expected or expected[0] != (False, False):
            return None
        head_end = data.find(b"\r\n\r\n", 0, self._max_head) + 4
        if head_end < 4:
            return None
        raw = data[:head_end]
        match = _WHOLE_HEAD.fullmatch(raw)
        if match is None or raw.count(b"\n") - 2 > self._max_headers:
            return None
        status = int(match[2])
        if status < 200 or status == 204 or status == 304:
            return None
        lower = raw.lower()
        length = -1
        keep_alive = close = watched = False
        for name, value in self._fields.findall(lower):
            value = value.strip(b" \t\r")
            if name == b"content-length" and length < 0 and value.isdigit() and len(value) < 19:
                length = int(value)
            elif name == b"connection" and not (keep_alive or close) and value == b"keep-alive":
                keep_alive = True
            elif name == b"connection" and not (keep_alive or close) and value == b"close":
                close = True
            elif name in self._watched:
                watched = True
            else:  # Transfer-Encoding, a second field, a list of options...
                return None
        if length < 0 or head_end + length < len(data):
            return None  # no length, or more after this response (pipelined)
        version = HTTP_11 if match[1] == b"1" else HTTP_10
        if version == HTTP_10 and not keep_alive:
            close = True

        head = ResponseHead(version, status, match[3] or b"", None, raw)
        head._lower = lower
        if self._watched:
            head.plain = not watched
        replacement = self._rewritten(head)
        self._must_close = close
        remaining = head_end + length - len(data)
        if remaining:
            self._state = _BODY_LENGTH
            self._remaining = remaining
        else:
            self._complete()
        if replacement is None:
            return [data]
        body = len(data) - head_end
        if not body:
            return [replacement]
        return [replacement, data[head_end:] if body <= _COPY_MAX else memoryview(data)[head_end:]]

    def feed_eof(self) -> list[bytes | memoryview]:
        """The upstream closed its side. Raises ResponseError if a response was cut short."""
        if self._error is not None:
            raise ResponseError(f"the response stream is already broken: {self._error}")
        if self._eof:
            return []
        self._eof = True
        state = self._state
        if state is _BODY_CLOSE:
            self._complete()
        elif state is _HEAD:
            if self._head_buf:
                self._fail(f"upstream closed in a response head ({len(self._head_buf)} bytes)")
        elif state is _BODY_LENGTH:
            self._fail(f"upstream closed {self._remaining} bytes before the end of a body")
        elif state is not _UPGRADED and state is not _DONE:
            self._fail("upstream closed in a chunked body")
        return []

    # --- internals --------------------------------------------------------------------

    def _fail(self, message: str) -> NoReturn:
        self._error = message
        raise ResponseError(message)

    def _flush(self, data: bytes, upto: int) -> None:
        """Emit the pass-through run of ``data`` that ends at ``upto``."""
        run = self._run
        if upto > run:
            if upto - run == len(data):
                self._out.append(data)
            elif upto - run <= _COPY_MAX:
                self._out.append(data[run:upto])
            else:
                self._out.append(memoryview(data)[run:upto])
        self._run = upto

    def _read_head(self, data: bytes, pos: int) -> int:
        if not self._expected:
            raise ResponseError("unsolicited response: no request is waiting for one")
        max_head = self._max_head
        buf = self._head_buf
        if not buf:
            stop = pos + max_head
            crlf = data.find(b"\n\r\n", pos, stop)
            lf = data.find(b"\n\n", pos, stop if crlf < 0 else crlf + 2)
            if lf >= 0:
                head_end = lf + 2
            elif crlf >= 0:
                head_end = crlf + 3
            else:
                if len(data) - pos >= max_head:
                    raise ResponseError(f"response head larger than {max_head} bytes")
                self._flush(data, pos)
                buf += data[pos:]
                self._run = len(data)
                return len(data)
            raw = data[pos:head_end]
            held = False
        else:
            # The head began in an earlier feed: this one starts with its remainder.
            old = len(buf)
            buf += data[pos : pos + max_head - old]
            start = max(0, old - 2)
            crlf = buf.find(b"\n\r\n", start)
            lf = buf.find(b"\n\n", start)
            if lf >= 0 and (crlf < 0 or lf < crlf):
                head_end = lf + 2
            elif crlf >= 0:
                head_end = crlf + 3
            else:
                if len(buf) >= max_head:
                    raise ResponseError(f"response head larger than {max_head} bytes")
                self._run = len(data)
                return len(data)
            raw = bytes(buf[:head_end])
            buf.clear()
            head_end = pos + head_end - old
            held = True

        head = self._parse_head(raw)
        self._start(head)
        replacement = self._rewritten(head)
        if replacement is not None or held:
            self._flush(data, pos)
            self._out.append(raw if replacement is None else replacement)
            self._run = head_end
        return head_end

    def _rewritten(self, head: ResponseHead) -> bytes | None:
        """What the rewrite hook puts in place of ``head`` (None: keep it)."""
        if self._rewrite is None:
            return None
        try:
            return self._rewrite(head)
        except Exception as exc:
            self._error = f"the rewrite hook raised {exc!r}"
            raise

    def _parse_head(self, raw: bytes) -> ResponseHead:
        if raw.count(b"\n") - 2 > self._max_headers:
            raise ResponseError(f"response head with more than {self._max_headers} fields")
        match = _WHOLE_HEAD.fullmatch(raw)
        if match is None:
            raise _head_error(raw)
        version = HTTP_11 if match[1] == b"1" else HTTP_10
        status = int(match[2])
        if status < 100:
            raise ResponseError(f"invalid status code {match[2]!r}")
        return ResponseHead(version, status, match[3] or b"", None, raw)

    def _start(self, head: ResponseHead) -> None:
        """Decide how the response that ``head`` begins is framed (RFC 9112 §6.3)."""
        is_head, upgrade = self._expected[0]
        status = head.status
        if status < 200:
            if status == 101:
                if not upgrade:
                    raise ResponseError("101 Switching Protocols to a request without upgrade")
                self._expected.popleft()
                self._responses += 1
                self._state = _UPGRADED
            return  # other 1xx are interim: the final response is still to come
        # Only the fields that decide framing are looked at, found in the lowered head.
        lengths: list[bytes] = []
        codings: list[bytes] = []
        close = upgrade  # not upgraded: what the client sent after its request may not be HTTP
        keep_alive = False
        for name, value in _FRAMING_FIELDS.findall(head.lower):
            value = value.strip(b" \t\r")
            if name == b"content-length":
                lengths.append(value)
            elif name == b"transfer-encoding":
                codings.append(value)
            else:
                for option in value.split(b","):
                    option = option.strip(b" \t")
                    if option == b"close":
                        close = True
                    elif option == b"keep-alive":
                        keep_alive = True
        http_10 = head.version == HTTP_10
        if http_10 and not keep_alive:
            close = True

        if is_head or status == 204 or status == 304:
            state = _HEAD
            length = 0
        elif codings:
            if lengths:
                raise ResponseError("response with both Transfer-Encoding and Content-Length")
            final = [c.strip(b" \t") for c in b",".join(codings).lower().split(b",")]
            final = [c for c in final if c]
            chunked = bool(final) and final[-1] == b"chunked"
            if sum(b"chunked" in c for c in final) != chunked:
                # "chunked, identity", "chunked" twice: browsers read these as chunked
                # while RFC 9112 reads to the close; either way the two would disagree.
                raise ResponseError("chunked is not the one final transfer coding")
            state = _CHUNK_SIZE if chunked else _BODY_CLOSE
            # RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means faulty framing.
            close = close or http_10 or not chunked
            length = 0
        elif lengths:
            length = _content_length(lengths)
            state = _BODY_LENGTH if length else _HEAD
        else:
            state = _BODY_CLOSE
            close = True
            length = 0

        self._must_close = close
        if state is _HEAD:
            self._complete()
        else:
            self._state = state
            self._remaining = length
            self._trailer_size = 0

    def _complete(self) -> None:
        self._expected.popleft()
        self._responses += 1
        self._state = _DONE if self._must_close else _HEAD

    def _take_line(
        self, data: bytes, pos: int, limit: int, too_long: str
    ) -> tuple[bytes | None, int]:
        """The line at ``pos`` (LF included, with any part held from earlier feeds)."""
        buf = self._line_buf
        room = limit - len(buf)
        nl = data.find(b"\n", pos, pos + room)
        if nl < 0:
            if len(data) - pos >= room:
                raise ResponseError(too_long)
            buf += data[pos:]
            return None, len(data)
        if buf:
            line = bytes(buf) + data[pos : nl + 1]
            buf.clear()
        else:
            line = data[pos : nl + 1]
        return line, nl + 1

    def _read_chunk_size(self, data: bytes, pos: int) -> int:
        line, pos = self._take_line(
            data, pos, MAX_CHUNK_LINE, f"chunk-size line longer than {MAX_CHUNK_LINE} bytes"
        )
        if line is None:
            return pos
        match = _CHUNK_SIZE_LINE.fullmatch(line)
        if match is None:
            raise ResponseError(f"malformed chunk-size line {line[:64]!r}")
        size = int(match[1], 16)
        if size:
            self._remaining = size
            self._state = _CHUNK_DATA
        else:
            self._state = _TRAILERS
        return pos

    def _read_trailer(self, data: bytes, pos: int) -> int:
        limit = self._max_head - self._trailer_size
        too_long = f"trailer section larger than {self._max_head} bytes"
        line, pos = self._take_line(data, pos, limit, too_long)
        if line is None:
            return pos
        self._trailer_size += len(line)
        if line == b"\r\n" or line == b"\n":
            self._complete()
        elif _FIELD_LINE.fullmatch(line) is None:
            raise ResponseError(f"malformed trailer line {line[:64]!r}")
        return pos


def _content_length(values: list[bytes]) -> int:
    """The one length that every Content-Length value agrees on."""
    if len(values) == 1 and values[0].isdigit() and len(values[0]) <= 18:
        return int(values[0])  # the common case
    length: int | None = None
    for value in values:
        for item in value.split(b","):
            item = item.strip(b" \t")
            if not item.isdigit() or len(item.lstrip(b"0")) > 19:
                raise ResponseError(f"invalid Content-Length {value[:64]!r}")
            number = int(item)
            if number > MAX_CONTENT_LENGTH:
                raise ResponseError(f"Content-Length {number} is too large")
            if length is not None and number != length:
                raise ResponseError(f"conflicting Content-Length values {values!r}")
            length = number
    assert length is not None
    return length


def _head_error(raw: bytes) -> ResponseError:
    """Say what is wrong with a head that did not parse (the slow path)."""
    lines = raw.split(b"\n")[:-2]
    for index, line in enumerate(lines):
        if line.endswith(b"\r"):
            line = line[:-1]
        where = "status line" if index == 0 else f"header line {index}"
        if b"\x00" in line:
            return ResponseError(f"NUL in {where}")
        if b"\r" in line:
            return ResponseError(f"bare CR in {where}")
        if index == 0:
            if not line:
                return ResponseError("empty line before the status line")
            if _STATUS_LINE.fullmatch(line + b"\n") is None:
                return ResponseError(f"malformed status line {line[:64]!r}")
            continue
        if line[:1] in (b" ", b"\t"):
            return ResponseError(f"obsolete line folding in {where}")
        name, colon, _ = line.partition(b":")
        if not colon:
            return ResponseError(f"{where} has no colon: {line[:64]!r}")
        if name != name.rstrip(b" \t"):
            return ResponseError(f"whitespace before the colon in {where}: {name[:64]!r}")
        if _TOKEN.fullmatch(name) is None:
            return ResponseError(f"invalid field name in {where}: {name[:64]!r}")
    return ResponseError(f"malformed response head {raw[:64]!r}")
