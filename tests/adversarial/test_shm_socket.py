"""The shm notification socket: any local process can find it (/proc/net/unix lists the
abstract name), so it must refuse clients that do not prove the engine's secret, and
notifications carry the identity proven at connect time, not one claimed per message."""

from __future__ import annotations

import struct

import pytest
from notify_checks import assert_serves_honest_peer, send_unauthenticated

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
        send_unauthenticated(name, (forged, b"\0" * 64, b"x"))
        assert eng.notifications() == []
        assert_serves_honest_peer(eng, "shm", timeout=5)
