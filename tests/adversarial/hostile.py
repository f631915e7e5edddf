"""A hostile tcp client written from the wire documentation (native/src/backends/tcp/tcp_wire.h
and docs/security.md), not from kvxfer's own code: frames are packed here by hand.

`HostileClient(port)` knows only the port; `authenticate(descriptor)` does what a peer
holding the descriptor (the capability) can do.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct

import kvxfer

HDR = struct.Struct("<HBBIQQQ")
MAGIC = 0x544B
VERSION = 2
HELLO, HELLO_ACK, WRITE, END, READ_REQ, NOTIFY, ACK, READ_DATA, NOTIFY_ACK, CHALLENGE, PROOF = range(1, 12)


def frame(kind, aux=0, job=0, a=0, b=0, body=b"", version=VERSION) -> bytes:
    return HDR.pack(MAGIC, version, kind, aux, job, a, b) + body


def tcp_port(descriptor: bytes) -> int:
    d = kvxfer._native.decode_descriptor(descriptor)
    info = dict(d["backends"])["tcp"]
    return struct.unpack_from("<H", info, 2)[0]


def region_tag(descriptor: bytes, region_id: int) -> int:
    d = kvxfer._native.decode_descriptor(descriptor)
    names = [b[0] for b in d["backends"]]
    for r in d["regions"]:
        if r["id"] == region_id:
            key = r["remote_keys"][names.index("tcp")]
            return struct.unpack("<Q", key[:8])[0] if len(key) >= 8 else 0
    raise KeyError(region_id)


class HostileClient:
    def __init__(self, port: int, timeout: float = 5.0):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def close(self) -> None:
        self.s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, data: bytes) -> bool:
        """False when the target already closed the connection."""
        try:
            self.s.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def recv_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.s.recv(n - len(out))
            if not chunk:
                raise ConnectionError(f"closed after {len(out)} of {n} bytes")
            out += chunk
        return out

    def recv_frame(self):
        _, _, kind, aux, job, a, b = HDR.unpack(self.recv_exact(HDR.size))
        return kind, aux, job, a, b

    def everything_until_closed(self, timeout: float = 5.0) -> bytes:
        """All bytes the target sends until it closes (or `timeout` of silence)."""
        self.s.settimeout(timeout)
        out = b""
        try:
            while True:
                chunk = self.s.recv(65536)
                if not chunk:
                    return out
                out += chunk
        except (ConnectionResetError, TimeoutError, OSError):
            return out

    def hello(
        self, initiator: int, target: int, name: bytes = b"mallory", link: int = 1, nonce=None
    ) -> bytes:
        self.nonce = nonce or os.urandom(32)
        self.initiator, self.link, self.name = initiator, link, name
        self.send(frame(HELLO, aux=len(name), job=initiator, a=target, b=link, body=name + self.nonce))
        return self.nonce

    def authenticate(self, descriptor: bytes, initiator: int = 4242, name: bytes = b"mallory", link: int = 1):
        """The full handshake with the secret from `descriptor`. Returns the HELLO_ACK status."""
        d = kvxfer._native.decode_descriptor(descriptor)
        secret = d["secret"]
        self.hello(initiator, d["instance_id"], name, link)
        kind, aux, job, a, b = self.recv_frame()
        assert kind == CHALLENGE, kind
        body = self.recv_exact(b)
        server_nonce, server_mac = body[:32], body[32:64]
        want = hmac.new(secret, b"kvxfer-tcp-target\0" + self.nonce + server_nonce, hashlib.sha256).digest()
        assert hmac.compare_digest(server_mac, want), "target did not prove the secret"
        proof = hmac.new(
            secret,
            b"kvxfer-tcp-initiator\0"
            + server_nonce
            + self.nonce
            + struct.pack("<QQ", initiator, link)
            + name,
            hashlib.sha256,
        ).digest()
        self.send(frame(PROOF, b=32, body=proof))
        kind, aux, job, a, b = self.recv_frame()
        assert kind == HELLO_ACK
        if b:
            self.recv_exact(b)
        return aux
