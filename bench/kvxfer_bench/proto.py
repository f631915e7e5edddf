"""The control connection between the initiator and the target.

A message is a JSON header plus binary blobs (descriptors, block ids, checksums):

    u32 header length (big endian) | header (UTF-8 JSON, with "blobs": [len, ...]) | blobs

Requests carry ``"cmd"``; replies carry ``"ok"`` and, on failure, ``"error"`` and
``"type"`` (the exception class). One request is outstanding at a time.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

import numpy as np

PROTOCOL = 1
_HDR = struct.Struct("!I")
MAX_HEADER = 16 << 20


class ProtocolError(Exception):
    pass


class RemoteError(Exception):
    """The target failed a request; ``type`` is the remote exception class name."""

    def __init__(self, message: str, type_name: str = ""):
        super().__init__(message)
        self.type_name = type_name


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ProtocolError("control connection closed by the peer")
        got += k
    return bytes(buf)


def send(sock: socket.socket, header: dict[str, Any], blobs: list[bytes] | None = None) -> None:
    blobs = [bytes(b) if not isinstance(b, bytes | bytearray) else b for b in (blobs or [])]
    head = dict(header)
    head["blobs"] = [len(b) for b in blobs]
    data = json.dumps(head, separators=(",", ":")).encode()
    sock.sendall(_HDR.pack(len(data)) + data)
    for b in blobs:
        sock.sendall(b)


def recv(sock: socket.socket) -> tuple[dict[str, Any], list[bytes]]:
    (n,) = _HDR.unpack(_recv_exact(sock, _HDR.size))
    if n > MAX_HEADER:
        raise ProtocolError(f"control message header of {n} bytes: not a kvxfer-bench peer?")
    try:
        header = json.loads(_recv_exact(sock, n))
    except ValueError as e:
        raise ProtocolError(f"malformed control message: {e}") from None
    blobs = [_recv_exact(sock, int(k)) for k in header.pop("blobs", [])]
    return header, blobs


def array_blob(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def blob_array(b: bytes, dtype: Any) -> np.ndarray:
    return np.frombuffer(b, dtype=dtype).copy()


class Channel:
    """Request/reply over one socket (initiator side)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def call(
        self, cmd: str, blobs: list[bytes] | None = None, **fields: Any
    ) -> tuple[dict[str, Any], list[bytes]]:
        self.start(cmd, blobs, **fields)
        return self.finish(cmd)

    def start(self, cmd: str, blobs: list[bytes] | None = None, **fields: Any) -> None:
        """Sends a request without waiting for its reply (work overlaps until finish())."""
        send(self.sock, {"cmd": cmd, **fields}, blobs)

    def finish(self, cmd: str) -> tuple[dict[str, Any], list[bytes]]:
        reply, rblobs = recv(self.sock)
        if not reply.get("ok"):
            raise RemoteError(f"target: {cmd}: {reply.get('error', 'failed')}", reply.get("type", ""))
        return reply, rblobs

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def parse_hostport(text: str, default_host: str = "") -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``PORT``."""
    text = text.strip()
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    elif text.isdigit():
        host, port = default_host, text
    else:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"bad port in {text!r}")
    return host, int(port)
