"""The shm notification socket: any local process can find it (/proc/net/unix lists the
abstract name), so it must refuse clients that do not prove the engine's secret, and
notifications carry the identity proven at connect time, not one claimed per message."""

from __future__ import annotations

import socket
import struct
import time

import pytest

import kvxfer

pytestmark = pytest.mark.skipif(
    not any(b.name == "shm" and b.available for b in kvxfer.list_backends()),
    reason="this build has no shm backend",
)


def abstract_name(engine) -> bytes:
    d = kvxfer._native.decode_descriptor(engine.descriptor())
    info = dict(d["backends"])["shm"]
    return info[12:]


def test_abstract_socket_is_listed_for_every_local_user():
    with kvxfer.Engine("victim", backends=["shm"]) as eng:
        name = abstract_name(eng)
        with open("/proc/net/unix") as f:
            assert "@" + name.decode() in f.read()


def test_unauthenticated_client_cannot_inject_notifications():
    with kvxfer.Engine("victim", backends=["shm"]) as eng:
        name = abstract_name(eng)
        forged = struct.pack("<QH", 1234, 5) + b"admin" + b"bytes in place"
        for payload in (forged, b"\0" * 64, b"x"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(2)
            try:
                s.connect(b"\0" + name)
                for _ in range(3):
                    try:
                        s.send(payload)
                    except OSError:
                        break
                time.sleep(0.2)
            finally:
                s.close()
        assert eng.notifications() == []
        # The engine still serves an honest peer.
        with kvxfer.Engine("honest", backends=["shm"]) as other:
            peer = other.add_peer(eng.descriptor())
            other.notify(peer, b"hi")
            (note,) = eng.wait_for_notifications(1, timeout=5)
            assert (note.peer, note.payload) == ("honest", b"hi")
