"""A client on localhost that knows only the tcp port can neither read, write nor notify,
learns nothing from the target's replies, and cannot disturb another peer's connection.
A client that holds the descriptor (the capability) still learns nothing from error replies.
"""

from __future__ import annotations

import re
import struct
import time

import numpy as np
import pytest
from hostile import (
    CHALLENGE,
    END,
    HELLO_ACK,
    NOTIFY,
    PROOF,
    READ_DATA,
    READ_REQ,
    WRITE,
    HostileClient,
    frame,
    region_tag,
    tcp_port,
)

import kvxfer
from kvxfer import Op, errors

pytestmark = pytest.mark.skipif(
    not any(b.name == "tcp" and b.available for b in kvxfer.list_backends()),
    reason="this build has no tcp backend",
)

SIZE = 1 << 20


@pytest.fixture
def target():
    eng = kvxfer.Engine("victim", backends=["tcp"])
    buf = np.full(SIZE, 0x5A, np.uint8)
    region = eng.register(buf)
    yield eng, buf, region
    eng.close()


def numbers_in(data: bytes) -> set[int]:
    """Every decimal or hex number in `data` (what an error reply could leak)."""
    text = data.decode("latin-1")
    out = {int(m, 16) for m in re.findall(r"0x([0-9a-fA-F]+)", text)}
    out |= {int(m) for m in re.findall(r"\b(\d{4,})\b", text)}
    return out


def test_default_listen_address_is_loopback(monkeypatch):
    monkeypatch.delenv("KVXFER_TCP_LISTEN", raising=False)
    with kvxfer.Engine("lo", backends=["tcp"]) as eng:
        assert "listening on 127.0.0.1:" in eng.describe_backends()
    for bad in ("127.0.0.1:99999", "0.0.0.0:-1", "300.1.1.1:80", "host:port"):
        cfg = kvxfer.EngineConfig()
        cfg.backend.tcp.listen = bad
        with pytest.raises(errors.InvalidArgumentError, match="listen"):
            kvxfer.Engine("bad", backends=["tcp"], config=cfg)


def test_hello_with_a_wrong_instance_is_refused_without_naming_the_right_one(target):
    eng, buf, region = target
    with HostileClient(tcp_port(eng.descriptor())) as c:
        c.hello(initiator=1, target=eng.instance_id ^ 0xFFFF)
        kind, aux, job, a, b = c.recv_frame()
        body = c.recv_exact(b)
        assert kind == HELLO_ACK and aux != 0
        assert eng.instance_id not in (job, a) and eng.instance_id not in numbers_in(body)
        assert str(eng.instance_id).encode() not in body
        assert c.everything_until_closed() == b""


def test_port_only_client_can_neither_write_read_nor_notify(target):
    """The attacker even knows the instance id and the region's address and tag (a
    stronger attacker than the issue's): without the secret it gets no further than the
    challenge."""
    eng, buf, region = target
    desc = eng.descriptor()
    base = buf.ctypes.data
    tag = region_tag(desc, region.id)
    attacks = [
        frame(WRITE, aux=1, job=1, a=tag, b=64, body=struct.pack("<QQ", base, 64) + b"\xee" * 64)
        + frame(END, aux=1, job=1, b=4, body=b"pwnd"),
        frame(READ_REQ, aux=1, job=2, a=tag, b=64, body=struct.pack("<QQ", base, 64)),
        frame(NOTIFY, job=3, b=4, body=b"pwnd"),
        frame(PROOF, b=32, body=bytes(32)) + frame(NOTIFY, job=3, b=4, body=b"pwnd"),
    ]
    for attack in attacks:
        with HostileClient(tcp_port(desc)) as c:
            c.hello(initiator=7, target=eng.instance_id)
            kind, aux, job, a, b = c.recv_frame()
            assert kind == CHALLENGE
            c.recv_exact(b)
            c.send(attack)
            rest = c.everything_until_closed()
            # Nothing but a refusal: no READ_DATA, no ACK, no bytes of the region.
            assert b"\x5a" * 16 not in rest
            assert all(rest[i + 3] not in (READ_DATA,) for i in range(0, len(rest) - 3, 32))
    time.sleep(0.2)
    assert (buf == 0x5A).all()
    assert eng.notifications() == []


def test_read_req_errors_leak_no_addresses_or_bounds(target):
    """Even a holder of the capability cannot map the target's memory through error
    replies: every refused READ_REQ gets the same body whatever the address."""
    eng, buf, region = target
    desc = eng.descriptor()
    base = buf.ctypes.data
    tag = region_tag(desc, region.id)
    with HostileClient(tcp_port(desc)) as c:
        assert c.authenticate(desc) == 0
        bodies = set()
        for job, (addr, tg) in enumerate(
            [(base - 4096, tag), (base + SIZE, tag), (base + SIZE - 1, tag), (base, tag ^ 1), (0x1000, 0)]
        ):
            c.send(frame(READ_REQ, aux=1, job=job, a=tg, b=2, body=struct.pack("<QQ", addr, 2)))
            kind, aux, j, a, b = c.recv_frame()
            assert kind == READ_DATA and aux != 0 and j == job
            body = c.recv_exact(b)
            bodies.add(body)
            assert not numbers_in(body), body
        assert len(bodies) == 1, bodies


def test_hello_claiming_another_initiators_id_does_not_cut_its_connection(target):
    eng, buf, region = target
    src_eng = kvxfer.Engine("honest", backends=["tcp"])
    try:
        src = np.arange(SIZE, dtype=np.uint64).view(np.uint8)[:SIZE].copy()
        rs = src_eng.register(src)
        peer = src_eng.add_peer(eng.descriptor())
        ext = [[0, SIZE]]
        src_eng.post(Op.WRITE, peer, rs, region.id, local_extents=ext, remote_extents=ext).wait(10)
        # An attacker HELLOs as the honest initiator (its instance id is public), with and
        # without the capability.
        for with_secret in (False, True):
            with HostileClient(tcp_port(eng.descriptor())) as c:
                if with_secret:
                    c.authenticate(eng.descriptor(), initiator=src_eng.instance_id, name=b"honest", link=1)
                else:
                    c.hello(initiator=src_eng.instance_id, target=eng.instance_id, name=b"honest")
                    c.recv_frame()
                transfers = [
                    src_eng.post(Op.WRITE, peer, rs, region.id, local_extents=ext, remote_extents=ext)
                    for _ in range(4)
                ]
                for t in transfers:
                    t.wait(10)
                assert src_eng.stats()["transfers_failed"] == 0
        assert np.array_equal(buf, src)
    finally:
        src_eng.close()


def test_descriptor_holder_cannot_reach_a_region_with_a_wrong_tag(target):
    """Region tags are per registration: a write naming the right address with another
    tag (a stale or guessed one) is refused and nothing lands."""
    eng, buf, region = target
    desc = eng.descriptor()
    base = buf.ctypes.data
    tag = region_tag(desc, region.id)
    with HostileClient(tcp_port(desc)) as c:
        assert c.authenticate(desc) == 0
        for job, tg in enumerate([tag ^ 1, 0, tag + 1]):
            c.send(frame(WRITE, aux=1, job=job, a=tg, b=8, body=struct.pack("<QQ", base, 8) + b"\xee" * 8))
            c.send(frame(END, aux=1, job=job, b=1, body=b"x"))
            kind, aux, j, a, b = c.recv_frame()
            c.recv_exact(b)
            assert aux != 0
    assert (buf == 0x5A).all() and eng.notifications() == []


def test_peer_stalled_inside_a_frame_is_dropped(target):
    """An authenticated peer that stops in the middle of a WRITE frame (a stopped process, a
    dead link) holds the target's worker at most 5 s (kFrameStall), then its connection is
    dropped; the bytes it did send land only inside its region."""
    eng, buf, region = target
    desc = eng.descriptor()
    base = buf.ctypes.data
    with HostileClient(tcp_port(desc)) as c:
        assert c.authenticate(desc) == 0
        c.send(
            frame(
                WRITE,
                aux=1,
                job=1,
                a=region_tag(desc, region.id),
                b=4096,
                body=struct.pack("<QQ", base, 4096),
            )
        )
        c.send(b"\xab" * 100)  # then nothing more
        start = time.monotonic()
        c.everything_until_closed(timeout=15)
        elapsed = time.monotonic() - start
    assert 4.0 <= elapsed <= 8.0, elapsed
    assert (buf[4096:] == 0x5A).all()
