"""The scanners the MySQL relay runs on every chunk: `ResponseScanner` walks packet headers
of server responses and looks only at the first bytes of the packets that end one (OK, EOF,
ERR), which carry the server's status flags; `UploadScanner` follows a LOAD DATA LOCAL file.
No I/O, typed, free of asyncio like wire.py, so both can be compiled if profiles ask for it.
"""

from __future__ import annotations

import struct
from collections import deque

from dbmux.engines.mysql.wire import (
    MAX_PAYLOAD,
    RESPONSE_FIELDS,
    RESPONSE_PREPARE,
    RESPONSE_RESULT,
    RESPONSE_ROWS,
    RESPONSE_SIMPLE,
    RESPONSE_STRING,
    SERVER_MORE_RESULTS_EXISTS,
    SERVER_STATUS_AUTOCOMMIT,
    SERVER_STATUS_CURSOR_EXISTS,
    ProtocolViolation,
    parse_ok,
    parse_prepare_ok,
    read_lenenc,
)

_INSPECT = 32  # enough of a packet to read OK/EOF status flags and column counts
_HEADER = struct.Struct("<I")  # a packet header: length (3 bytes), sequence id
_HEADER_AND_FIRST = struct.Struct("<IB")  # ...and the payload's first byte

# Scanner states.
_IDLE = 0
_FIRST = 1  # first packet of a result: OK, ERR or the column count
_COLUMNS = 2  # column definitions of a result set
_META_EOF = 3  # the EOF after them (without CLIENT_DEPRECATE_EOF)
_ROWS = 4  # rows until EOF / OK / ERR
_SINGLE = 5  # one packet: OK, ERR or EOF
_STRING = 6  # one packet of text
_FIELDS = 7  # definitions until EOF or ERR
_PREPARE = 8  # statement OK or ERR
_SKIP = 9  # a known number of packets (prepare's definitions)
_UPLOAD = 10  # LOAD DATA LOCAL: the client sends the file; the server's OK or ERR follows

_ERR_MAY_FOLLOW = frozenset({_IDLE, _FIRST, _META_EOF, _ROWS, _SINGLE, _FIELDS, _PREPARE})

_START = {
    RESPONSE_RESULT: _FIRST,
    RESPONSE_SIMPLE: _SINGLE,
    RESPONSE_FIELDS: _FIELDS,
    RESPONSE_STRING: _STRING,
    RESPONSE_ROWS: _ROWS,
    RESPONSE_PREPARE: _PREPARE,
}


class ResponseScanner:
    """Walks server-to-client bytes and says when each expected response is complete.

    `expect()` queues the shape of the response to a command sent; `feed()` returns how many
    responses the chunk completed. `status` is the status flags of the last OK or EOF,
    `insert_id` the last nonzero insert id an OK reported, `failed` whether the last
    completed response was an ERR. Unsolicited packets (a server's last words before it
    hangs up) are kept in `unsolicited`. With `local_files`, a LOAD DATA LOCAL request sets
    `file_requested` and the response waits, without end, until `upload_done()`."""

    __slots__ = (
        "_carry",
        "_continued",
        "_skip",
        "columns",
        "deprecate_eof",
        "expected",
        "failed",
        "file_requested",
        "insert_id",
        "local_files",
        "seq",
        "state",
        "status",
        "unsolicited",
    )

    def __init__(self, deprecate_eof: bool, local_files: bool = False) -> None:
        self.deprecate_eof = deprecate_eof
        self.local_files = local_files
        self.file_requested = False
        self.expected: deque[int] = deque()
        self.state = _IDLE
        self.columns = 0
        self.status = SERVER_STATUS_AUTOCOMMIT
        self.insert_id = 0
        self.failed = False
        self.seq = 0  # sequence id of the last packet seen (at a boundary: the last one)
        self.unsolicited: bytes | None = None
        self._carry = b""
        self._skip = 0
        self._continued = False

    @property
    def busy(self) -> bool:
        return self.state != _IDLE

    @property
    def at_boundary(self) -> bool:
        """Whether the bytes fed so far end between two packets, at a point where an ERR
        may come next (ending the response, or with nothing asked, as a goodbye): where
        the proxy can put an ERR of its own into the relayed stream without corrupting it.
        Not inside a packet, a 16 MiB continuation, column definitions or prepare metadata."""
        return not (self._carry or self._skip or self._continued) and self.state in _ERR_MAY_FOLLOW

    def expect(self, kind: int) -> None:
        if self.state == _IDLE:
            self.state = _START[kind]
            self.seq = 0
        else:
            self.expected.append(kind)

    def feed(self, data: bytes) -> int:
        """How many responses `data` completed.

        One loop walks the packets where they lie in the chunk and reads the common ones
        inline (rows, column definitions, a result's column count, the EOF after the
        definitions), with no call per packet; the rest go to `_packet`. Of a packet split
        between chunks only its start is carried (header and inspected bytes), never the
        chunk."""
        done = 0
        if self._carry:
            pos, done = self._join(data)
            if pos < 0:
                return done
        else:
            pos = self._skip
        n = len(data)
        if pos >= n:
            self._skip = pos - n
            return done
        state = self.state
        columns = self.columns
        continued = self._continued
        deprecate_eof = self.deprecate_eof
        header_and_first = _HEADER_AND_FIRST.unpack_from
        while True:
            if state == _ROWS and not continued:
                # The bulk of a result set: a row is only its header and first byte.
                while pos + 5 <= n:
                    header, first = header_and_first(data, pos)
                    length = header & MAX_PAYLOAD
                    if first >= 0xFE or length == MAX_PAYLOAD:
                        break  # the end of the rows, or a long row: read below
                    pos += 4 + length
                    if pos >= n:
                        self.state, self.columns = state, columns
                        self.seq = header >> 24
                        self._skip = pos - n
                        return done
            # The header (length and sequence id, one u32) and the payload's first byte in
            # one call: a third of the cost of reading them byte by byte.
            if pos + 5 <= n:
                header, first = header_and_first(data, pos)
            elif pos + 4 == n:  # a header alone: whole only if its packet is empty
                header, first = _HEADER.unpack_from(data, pos)[0], -1
            else:
                break
            length = header & MAX_PAYLOAD
            start = pos + 4
            end = start + length
            if continued:
                continued = length == MAX_PAYLOAD
            elif end > n and start + _INSPECT > n:  # nor the bytes of it read below
                break
            else:
                continued = length == MAX_PAYLOAD
                if not length:
                    first = -1  # (the byte read belongs to the next packet)
                if state == _ROWS and first < 0xFE:
                    pass  # a row
                elif state == _COLUMNS:
                    columns -= 1
                    if not columns:
                        state = _ROWS if deprecate_eof else _META_EOF
                elif state == _FIRST and 0 < first < 0xFB:
                    columns = first  # a result set's column count, in one byte
                    state = _COLUMNS
                elif (
                    first == 0xFE
                    and length == 5
                    and not deprecate_eof
                    and state in (_ROWS, _META_EOF)
                ):
                    status = data[start + 3] | data[start + 4] << 8  # an EOF
                    if state == _META_EOF and not status & SERVER_STATUS_CURSOR_EXISTS:
                        self.status = status
                        state = _ROWS
                    else:  # the end of the rows, or of an execute whose rows a cursor holds
                        done += self._end(status)
                        state = self.state
                else:
                    self.state, self.columns = state, columns
                    done += self._packet(data, start, length)
                    state, columns = self.state, self.columns
            if end >= n:
                self.state, self.columns, self._continued = state, columns, continued
                self.seq = header >> 24
                self._skip = end - n
                return done
            pos = end
        self.state, self.columns, self._continued = state, columns, continued
        self._carry = data[pos:]
        self._skip = 0
        return done

    def _join(self, data: bytes) -> tuple[int, int]:
        """Finish the packet start carried from the last chunk with the first bytes of this
        one: (where the packet after it starts in `data`, responses it completed), or
        (-1, 0) when `data` is too short to finish it (then it is carried further)."""
        carry = self._carry
        head = carry + data[: 4 + _INSPECT - len(carry)]
        if len(head) >= 4:
            length = head[0] | head[1] << 8 | head[2] << 16
            want = 4 if self._continued else 4 + (length if length < _INSPECT else _INSPECT)
            if len(head) >= want:
                self._carry = b""
                done = self.feed(head[:want])  # that packet alone; _skip: the rest of it
                pos = want - len(carry) + self._skip
                self._skip = 0
                return pos, done
        self._carry = head
        return -1, 0

    def _packet(self, data: bytes, at: int, length: int) -> int:
        """Advance the state machine by one logical packet; 1 if it completed a response."""
        state = self.state
        first = data[at] if length else -1
        if state == _ROWS:
            if first == 0xFE and length < (MAX_PAYLOAD if self.deprecate_eof else 9):
                return self._end(self._terminator_status(data, at))
            if first == 0xFF:
                return self._error()
            return 0
        if state == _FIRST:
            if first == 0:
                return self._end(self._ok_status(data, at))
            if first == 0xFF:
                return self._error()
            if first == 0xFB:
                if not self.local_files:  # a server asking a client that did not allow it
                    raise ProtocolViolation("LOAD DATA LOCAL request the client did not allow")
                self.state = _UPLOAD
                self.file_requested = True
                return 0
            try:
                count, _ = read_lenenc(data, at)
            except (IndexError, ValueError):
                raise ProtocolViolation("malformed column count") from None
            if not count:
                raise ProtocolViolation("result set with no columns")
            self.columns = count
            self.state = _COLUMNS
            return 0
        if state == _COLUMNS:
            self.columns -= 1
            if self.columns == 0:
                self.state = _ROWS if self.deprecate_eof else _META_EOF
            return 0
        if state == _META_EOF:
            if first == 0xFF:
                return self._error()
            status = self._terminator_status(data, at)
            if status & SERVER_STATUS_CURSOR_EXISTS:
                return self._end(status)  # the rows come with COM_STMT_FETCH
            self.status = status
            self.state = _ROWS
            return 0
        if state == _SINGLE:
            if first == 0xFF:
                return self._error()
            if first == 0:
                return self._end(self._ok_status(data, at))
            if first == 0xFE:
                return self._end(self._terminator_status(data, at))
            raise ProtocolViolation(f"unexpected reply 0x{first & 0xFF:02x} to a command")
        if state == _STRING:
            return self._complete()
        if state == _FIELDS:
            if first == 0xFE and length < MAX_PAYLOAD:
                return self._complete()
            if first == 0xFF:
                return self._error()
            return 0
        if state == _PREPARE:
            if first == 0xFF:
                return self._error()
            if first != 0 or length < 9:
                raise ProtocolViolation("malformed COM_STMT_PREPARE reply")
            ok = parse_prepare_ok(data[at : at + 12])
            eofs = 0 if self.deprecate_eof else (ok.columns > 0) + (ok.params > 0)
            self.columns = ok.params + ok.columns + eofs
            if self.columns == 0:
                return self._complete()
            self.state = _SKIP
            return 0
        if state == _SKIP:
            self.columns -= 1
            return self._complete() if self.columns == 0 else 0
        if state == _UPLOAD:  # the server speaks only once it has the whole file
            raise ProtocolViolation("the server sent a packet during a LOAD DATA LOCAL upload")
        # Nothing was asked: a server's goodbye (an ERR before it closes), or a broken server.
        if first == 0xFF:
            self.unsolicited = bytes(data[at : at + length])
            return 0
        raise ProtocolViolation("the server sent a packet nobody asked for")

    def upload_done(self) -> None:
        """The client sent the whole file: the server's OK or ERR comes next."""
        self.state = _FIRST

    def _ok_status(self, data: bytes, at: int) -> int:
        """The status flags of an OK packet (noting its insert id); affected rows and insert
        id of one byte each, the usual, are read in place."""
        if at + 5 <= len(data) and data[at + 1] < 0xFB and data[at + 2] < 0xFB:
            insert_id = data[at + 2]
            if insert_id:
                self.insert_id = insert_id
            return data[at + 3] | data[at + 4] << 8
        try:
            ok = parse_ok(data[at : at + _INSPECT])
        except (IndexError, ValueError):
            raise ProtocolViolation("malformed OK packet") from None
        if ok.insert_id:
            self.insert_id = ok.insert_id
        return ok.status

    def _terminator_status(self, data: bytes, at: int) -> int:
        if self.deprecate_eof:
            return self._ok_status(data, at)
        return data[at + 3] | data[at + 4] << 8 if at + 5 <= len(data) else self.status

    def _end(self, status: int) -> int:
        """A result ended with these status flags; another may follow."""
        self.status = status
        if status & SERVER_MORE_RESULTS_EXISTS:
            self.state = _FIRST
            return 0
        self.failed = False
        self.state = _START[self.expected.popleft()] if self.expected else _IDLE
        return 1

    def _error(self) -> int:
        self.failed = True
        return self._next()

    def _complete(self) -> int:
        self.failed = False
        return self._next()

    def _next(self) -> int:
        self.state = _START[self.expected.popleft()] if self.expected else _IDLE
        return 1


class UploadScanner:
    """Walks the client-to-server bytes of a LOAD DATA LOCAL upload, relayed as they come:
    the file goes in packets and ends with an empty one (an empty packet right after one of
    16 MiB - 1 bytes only continues that one)."""

    __slots__ = ("_continued", "_header", "_skip")

    def __init__(self) -> None:
        self._header = b""  # a packet header split between chunks
        self._skip = 0  # bytes of the current packet still to come
        self._continued = False

    def feed(self, data: bytes) -> int:
        """Where in `data` the upload ends (just after its empty packet), or -1."""
        n = len(data)
        pos = min(self._skip, n)
        self._skip -= pos
        while pos < n:
            take = 4 - len(self._header)
            header = self._header + data[pos : pos + take]
            pos += take
            if len(header) < 4:
                self._header = header
                return -1
            self._header = b""
            length = header[0] | header[1] << 8 | header[2] << 16
            if length == 0 and not self._continued:
                return pos
            self._continued = length == MAX_PAYLOAD
            self._skip = max(pos + length - n, 0)
            pos += length
        return -1
