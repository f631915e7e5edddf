"""A kvxfer-compatible peer written with plain verbs (Debian's python3-pyverbs): it speaks
the ibverbs backend's connection manager (native/src/backends/ibverbs/README.md) from the
wire format alone, so it checks that the format is complete and plain-verbs implementable.

It can act as a target (answers CONNECT_REQ, receives notifications, publishes its own MR in
a descriptor built with kvxfer._native.encode_descriptor) and as an initiator (sends
CONNECT_REQ to a kvxfer engine, then RDMA-WRITEs / READs into kvxfer-registered memory and
SENDs notifications).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import struct
import sys
import threading
import time

PYVERBS_DIST = "/usr/lib/python3/dist-packages/pyverbs"


def import_pyverbs(tmpdir: str):
    """Imports Debian's pyverbs into this interpreter through a directory holding only a
    symlink to it (the rest of dist-packages must not shadow this Python's packages)."""
    if not os.path.isdir(PYVERBS_DIST):
        raise ImportError(f"{PYVERBS_DIST} is missing (apt-get install python3-pyverbs)")
    link_dir = os.path.join(tmpdir, "pyverbs-only")
    os.makedirs(link_dir, exist_ok=True)
    link = os.path.join(link_dir, "pyverbs")
    if not os.path.islink(link):
        os.symlink(PYVERBS_DIST, link)
    if link_dir not in sys.path:
        sys.path.insert(0, link_dir)
    import pyverbs.device  # noqa: F401

    return sys.modules["pyverbs"]


# ---- wire format (see README.md) ------------------------------------------------------------
EP_MAGIC, CM_MAGIC, NOTE_MAGIC = 0x4249564B, 0x4D43564B, 0x544E564B
REQ, REP, REJ, DISC, CHALLENGE = 1, 2, 3, 4, 5
CM_VERSION = 2
GRH = 40
QKEY = 0x11223344
ZERO_NONCE = bytes(32)
# MAC labels: HMAC-SHA256(secret, label || every byte of the message before the MAC).
LABEL_INITIATOR = b"kvxfer-ibverbs-initiator\0"
LABEL_TARGET = b"kvxfer-ibverbs-target\0"
LABEL_DISCONNECT = b"kvxfer-ibverbs-disconnect\0"


def encode_endpoint(gid: bytes, mtu: int, ud_qpn: int, qkey: int, port: int = 1, lid: int = 0) -> bytes:
    return struct.pack("<IBBBB16sHHIII", EP_MAGIC, 1, 2, mtu, port, gid, lid, 0, ud_qpn, qkey, 0)


def decode_endpoint(b: bytes) -> dict:
    magic, ver, ll, mtu, port, gid, lid, _, qpn, qkey, _ = struct.unpack("<IBBBB16sHHIII", b[:40])
    assert magic == EP_MAGIC and ver == 1
    return dict(link_layer=ll, mtu=mtu, port=port, gid=gid, lid=lid, ud_qpn=qpn, qkey=qkey)


def encode_cm(
    kind: int,
    conn_id: int,
    src: int,
    dst: int,
    *,
    gid=b"",
    ud_qpn=0,
    qkey=0,
    lid=0,
    mtu=0,
    rd_atomic=0,
    generation=0,
    qps=(),
    name=b"",
    reason=0,
    text=b"",
    initiator_nonce=ZERO_NONCE,
    target_nonce=ZERO_NONCE,
    secret: bytes | None = None,
    label: bytes = b"",
    mac: bytes | None = None,
) -> bytes:
    """One CM datagram. REQ, REP and DISC end with initiator nonce | target nonce | MAC; the
    MAC is computed with `secret` and `label`, or is `mac` as given (zeros by default)."""
    body = b""
    if kind in (REQ, REP):
        body = struct.pack("<16sIIHBBIB3x", gid, ud_qpn, qkey, lid, mtu, rd_atomic, generation, len(qps))
        body += b"".join(struct.pack("<II", q, p) for q, p in qps)
        body += struct.pack("<H", len(name)) + name
    elif kind == REJ:
        body = struct.pack("<IH", reason, len(text)) + text
    elif kind == CHALLENGE:
        body = initiator_nonce + target_nonce
    signed = kind in (REQ, REP, DISC)
    if signed:
        body += initiator_nonce + target_nonce
    length = 32 + len(body) + (32 if signed else 0)
    msg = struct.pack("<IBBHQQQ", CM_MAGIC, CM_VERSION, kind, length, conn_id, src, dst) + body
    if signed:
        if secret is not None:
            mac = hmac.new(secret, label + msg, hashlib.sha256).digest()
        msg += mac if mac is not None else bytes(32)
    return msg


def decode_cm(b: bytes) -> dict | None:
    if len(b) < 32:
        return None
    magic, ver, kind, length, conn_id, src, dst = struct.unpack("<IBBHQQQ", b[:32])
    if magic != CM_MAGIC or ver != CM_VERSION or length > len(b):
        return None
    m = dict(kind=kind, conn_id=conn_id, src=src, dst=dst)
    if kind in (REQ, REP, DISC):
        m.update(
            initiator_nonce=b[length - 96 : length - 64],
            target_nonce=b[length - 64 : length - 32],
            mac=b[length - 32 : length],
            signed=b[: length - 32],
        )
    elif kind == CHALLENGE:
        m.update(initiator_nonce=b[32:64], target_nonce=b[64:96])
    if kind in (REQ, REP):
        gid, qpn, qkey, lid, mtu, rd, gen, n = struct.unpack("<16sIIHBBIB3x", b[32:68])
        qps = [struct.unpack("<II", b[68 + 8 * i : 76 + 8 * i]) for i in range(n)]
        off = 68 + 8 * n
        (nl,) = struct.unpack("<H", b[off : off + 2])
        m.update(
            gid=gid,
            ud_qpn=qpn,
            qkey=qkey,
            lid=lid,
            mtu=mtu,
            rd_atomic=rd,
            generation=gen,
            qps=qps,
            name=b[off + 2 : off + 2 + nl].decode(),
        )
    elif kind == REJ:
        reason, nl = struct.unpack("<IH", b[32:38])
        m.update(reason=reason, text=b[38 : 38 + nl].decode(errors="replace"))
    return m


def proves(m: dict, secret: bytes, label: bytes) -> bool:
    return hmac.compare_digest(hmac.new(secret, label + m["signed"], hashlib.sha256).digest(), m["mac"])


def gid_text(raw: bytes) -> str:
    return ":".join(raw[i : i + 2].hex() for i in range(0, 16, 2))


class PvPeer:
    """One pyverbs "engine": a UD connection manager, RC QPs, one data MR."""

    def __init__(
        self, name: str, device: str = "rxe0", gid_index: int = 1, region_bytes: int = 1 << 20, nqps: int = 2
    ):
        import pyverbs.enums as e
        from pyverbs.addr import GID  # noqa: F401
        from pyverbs.cq import CQ
        from pyverbs.device import Context
        from pyverbs.mr import MR
        from pyverbs.pd import PD
        from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr

        self.e = e
        self.name = name
        self.instance = random.getrandbits(63) | 1
        self.secret = os.urandom(32)  # this peer's capability, in its descriptor
        self.challenges = {}  # (initiator instance, conn id) -> (initiator nonce, target nonce)
        self.refused = []  # CONNECT_REQs that failed authentication (target side)
        self.check_proofs = True  # False: accept any proof (a hostile target, for tests)
        self.port = 1
        self.gid_index = gid_index
        self.nqps = nqps
        self.ctx = Context(name=device)
        self.pd = PD(self.ctx)
        self.cq = CQ(self.ctx, 4096)
        self.mtu = int(self.ctx.query_port(self.port).active_mtu)
        self.gid = bytes.fromhex(self.ctx.query_gid(self.port, gid_index).gid.replace(":", ""))
        access = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE | e.IBV_ACCESS_REMOTE_READ
        self.region_bytes = region_bytes
        self.mr = MR(self.pd, region_bytes, access)
        # UD connection manager: 32 receive slots then 8 send slots of 40 + 1024 bytes.
        self.slot = GRH + 1024
        self.ud_mr = MR(self.pd, 40 * self.slot, e.IBV_ACCESS_LOCAL_WRITE)
        cap = QPCap(max_send_wr=16, max_recv_wr=32, max_send_sge=1, max_recv_sge=1)
        attr = QPAttr()
        attr.qkey = QKEY
        attr.port_num = self.port
        self.ud = QP(self.pd, QPInitAttr(qp_type=e.IBV_QPT_UD, scq=self.cq, rcq=self.cq, cap=cap), attr)
        for i in range(32):
            self._post_ud_recv(i)
        self.next_send = 0
        # Notification receive buffers (RC QPs' own receive queues).
        self.note_bytes = 8 + 65536
        self.note_mr = MR(self.pd, 16 * self.note_bytes, e.IBV_ACCESS_LOCAL_WRITE)
        self.send_mr = MR(self.pd, self.note_bytes, e.IBV_ACCESS_LOCAL_WRITE)
        self.rc = []  # connected RC QPs (as target or initiator)
        self.conns = {}  # conn_id -> reply bytes (target side, for duplicate requests)
        self.notes = []
        self.pending_rep = {}
        self.completions = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._QP, self._QPAttr, self._QPCap, self._QPInitAttr = QP, QPAttr, QPCap, QPInitAttr

    # ---- descriptors ----
    def endpoint_info(self) -> bytes:
        return encode_endpoint(self.gid, self.mtu, self.ud.qp_num, QKEY)

    def descriptor(self) -> bytes:
        import kvxfer._native as native

        key = struct.pack("<IQ", self.mr.rkey, self.mr.buf)
        return native.encode_descriptor(
            {
                "engine_name": self.name,
                "instance_id": self.instance,
                "host_id": "pyverbs-peer",
                "pid": 0,
                "secret": self.secret,
                "backends": [("ibverbs", self.endpoint_info())],
                "regions": [
                    {
                        "id": 0,
                        "base_address": self.mr.buf,
                        "length": self.region_bytes,
                        "layout": None,
                        "remote_keys": [key],
                    }
                ],
            }
        )

    def read(self, offset: int, length: int) -> bytes:
        return self.mr.read(length, offset)

    def write_local(self, offset: int, data: bytes) -> None:
        self.mr.write(data, len(data), offset)

    # ---- verbs plumbing ----
    def _post_ud_recv(self, i: int) -> None:
        from pyverbs.wr import SGE, RecvWR

        sge = SGE(self.ud_mr.buf + i * self.slot, self.slot, self.ud_mr.lkey)
        self.ud.post_recv(RecvWR(wr_id=i, num_sge=1, sg=[sge]))

    def _ah(self, gid: bytes):
        from pyverbs.addr import AH, GID, AHAttr, GlobalRoute

        gr = GlobalRoute(dgid=GID(gid_text(gid)), sgid_index=self.gid_index, hop_limit=64)
        return AH(self.pd, attr=AHAttr(gr=gr, is_global=1, port_num=self.port))

    def _send_ud(self, msg: bytes, gid: bytes, qpn: int, qkey: int) -> None:
        from pyverbs.wr import SGE, SendWR

        i = 32 + self.next_send % 8
        self.next_send += 1
        self.ud_mr.write(msg, len(msg), i * self.slot)
        wr = SendWR(
            wr_id=1000 + i,
            opcode=self.e.IBV_WR_SEND,
            num_sge=1,
            sg=[SGE(self.ud_mr.buf + i * self.slot, len(msg), self.ud_mr.lkey)],
            send_flags=self.e.IBV_SEND_SIGNALED,
        )
        wr.set_wr_ud(self._ah(gid), qpn, qkey)
        self.ud.post_send(wr)

    def _new_rc(self):
        e = self.e
        cap = self._QPCap(max_send_wr=64, max_recv_wr=16, max_send_sge=1, max_recv_sge=1)
        attr = self._QPAttr()
        attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE | e.IBV_ACCESS_REMOTE_READ
        attr.port_num = self.port
        attr.pkey_index = 0
        qp = self._QP(
            self.pd, self._QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq, cap=cap), attr
        )
        return qp, random.getrandbits(24)

    def _connect_rc(self, qp, my_psn: int, remote_qpn: int, remote_psn: int, gid: bytes, mtu: int) -> None:
        from pyverbs.addr import GID, AHAttr, GlobalRoute

        a = self._QPAttr()
        a.path_mtu = mtu
        a.dest_qp_num = remote_qpn
        a.rq_psn = remote_psn
        a.max_dest_rd_atomic = 4
        a.min_rnr_timer = 12
        gr = GlobalRoute(dgid=GID(gid_text(gid)), sgid_index=self.gid_index, hop_limit=64)
        a.ah_attr = AHAttr(gr=gr, is_global=1, port_num=self.port)
        a.timeout = 15
        a.retry_cnt = 7
        a.rnr_retry = 7
        a.sq_psn = my_psn
        a.max_rd_atomic = 4
        qp.to_rts(a)
        for k in range(4):  # notification receive buffers
            self._post_note_recv(qp, len(self.rc) * 4 + k)
        self.rc.append(qp)

    def _post_note_recv(self, qp, index: int) -> None:
        from pyverbs.wr import SGE, RecvWR

        slot = index % 16
        sge = SGE(self.note_mr.buf + slot * self.note_bytes, self.note_bytes, self.note_mr.lkey)
        qp.post_recv(RecvWR(wr_id=2000 + slot, num_sge=1, sg=[sge]))

    # ---- the progress loop (a thread) ----
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                n, wcs = self.cq.poll(16)
                for wc in wcs[:n]:
                    self._on_wc(wc)
            if n == 0:
                time.sleep(0.0005)

    def _on_wc(self, wc) -> None:
        e = self.e
        if wc.qp_num == self.ud.qp_num:
            if wc.wr_id < 32:
                if wc.status == e.IBV_WC_SUCCESS:
                    raw = self.ud_mr.read(wc.byte_len - GRH, wc.wr_id * self.slot + GRH)
                    m = decode_cm(raw)
                    if m is not None:
                        self._on_cm(m)
                self._post_ud_recv(wc.wr_id)
            return
        if 2000 <= wc.wr_id < 2016:  # a notification
            if wc.status == e.IBV_WC_SUCCESS:
                raw = self.note_mr.read(wc.byte_len, (wc.wr_id - 2000) * self.note_bytes)
                magic, n = struct.unpack("<II", raw[:8])
                assert magic == NOTE_MAGIC and n == len(raw) - 8
                self.notes.append(raw[8:])
                qp = next(q for q in self.rc if q.qp_num == wc.qp_num)
                self._post_note_recv(qp, wc.wr_id - 2000)
            return
        self.completions[wc.wr_id] = wc.status

    def _on_cm(self, m: dict) -> None:
        if m["kind"] == REQ:
            if m["dst"] not in (0, self.instance):
                return
            key = (m["src"], m["conn_id"])
            if m["target_nonce"] == ZERO_NONCE:  # first request: challenge it
                nonce = self.challenges.setdefault(key, (m["initiator_nonce"], os.urandom(32)))[1]
                msg = encode_cm(
                    CHALLENGE,
                    m["conn_id"],
                    self.instance,
                    m["src"],
                    initiator_nonce=m["initiator_nonce"],
                    target_nonce=nonce,
                )
                self._send_ud(msg, m["gid"], m["ud_qpn"], m["qkey"])
                return
            if self.check_proofs and (
                self.challenges.get(key) != (m["initiator_nonce"], m["target_nonce"])
                or not proves(m, self.secret, LABEL_INITIATOR)
            ):
                self.refused.append(m)
                return
            if m["conn_id"] not in self.conns:
                mtu = min(m["mtu"], self.mtu)
                mine = []
                for rq, rp in m["qps"]:
                    qp, psn = self._new_rc()
                    self._connect_rc(qp, psn, rq, rp, m["gid"], mtu)
                    mine.append((qp.qp_num, psn))
                self.conns[m["conn_id"]] = encode_cm(
                    REP,
                    m["conn_id"],
                    self.instance,
                    m["src"],
                    gid=self.gid,
                    ud_qpn=self.ud.qp_num,
                    qkey=QKEY,
                    mtu=mtu,
                    rd_atomic=4,
                    generation=m["generation"],
                    qps=mine,
                    name=self.name.encode(),
                    initiator_nonce=m["initiator_nonce"],
                    target_nonce=m["target_nonce"],
                    secret=self.secret,
                    label=LABEL_TARGET,
                )
            self._send_ud(self.conns[m["conn_id"]], m["gid"], m["ud_qpn"], m["qkey"])
        elif m["kind"] in (REP, REJ, CHALLENGE):
            self.pending_rep.setdefault(m["conn_id"], []).append(m)

    # ---- initiator side ----
    def connect(
        self,
        kvxfer_descriptor: bytes,
        timeout: float = 30.0,
        secret: bytes | None = None,
        forge: str = "",
    ) -> dict:
        """CONNECT_REQ to a kvxfer engine; returns its decoded descriptor. Proves the
        descriptor's secret (or `secret`, to try a wrong one). `forge` sends what a client
        without the secret could: "no-proof" (a proof of zeros over the challenge's nonces),
        "own-nonce" (a target nonce the engine never issued, with a MAC under `secret`).
        Raises ConnectionRefusedError when the engine refuses, TimeoutError when it never
        connects."""
        import kvxfer._native as native

        d = native.decode_descriptor(kvxfer_descriptor)
        secret = d["secret"] if secret is None else secret
        ep = decode_endpoint(dict(d["backends"])["ibverbs"])
        conn_id = random.getrandbits(63) | 1
        ours = os.urandom(32)
        with self._lock:
            mine = [self._new_rc() for _ in range(self.nqps)]

        def request(theirs: bytes, **auth) -> bytes:
            return encode_cm(
                REQ,
                conn_id,
                self.instance,
                d["instance_id"],
                gid=self.gid,
                ud_qpn=self.ud.qp_num,
                qkey=QKEY,
                mtu=self.mtu,
                rd_atomic=4,
                generation=1,
                qps=[(q.qp_num, p) for q, p in mine],
                name=self.name.encode(),
                initiator_nonce=ours,
                target_nonce=theirs,
                **auth,
            )

        def answer(kinds) -> dict:
            deadline = time.monotonic() + timeout
            while True:
                got = self.pending_rep.get(conn_id) or []
                for m in got:
                    if m["kind"] in kinds:
                        got.remove(m)
                        return m
                if time.monotonic() > deadline:
                    raise TimeoutError(f"kvxfer engine sent no {kinds} for CONNECT_REQ")
                with self._lock:
                    self._send_ud(req, ep["gid"], ep["ud_qpn"], ep["qkey"])
                time.sleep(0.2)

        if forge == "own-nonce":
            req = request(os.urandom(32), secret=secret, label=LABEL_INITIATOR)
        else:
            req = request(ZERO_NONCE)
            ch = answer((CHALLENGE, REJ))
            if ch["kind"] == REJ:
                raise ConnectionRefusedError(ch["text"])
            assert ch["initiator_nonce"] == ours and ch["src"] == d["instance_id"], ch
            if forge == "no-proof":
                req = request(ch["target_nonce"], mac=bytes(32))
            else:
                req = request(ch["target_nonce"], secret=secret, label=LABEL_INITIATOR)
        rep = answer((REP, REJ))
        if rep["kind"] == REJ:
            raise ConnectionRefusedError(rep["text"])
        assert rep["src"] == d["instance_id"] and rep["dst"] == self.instance and rep["generation"] == 1
        assert rep["initiator_nonce"] == ours and proves(rep, d["secret"], LABEL_TARGET), "unproven reply"
        with self._lock:
            for (qp, psn), (rq, rp) in zip(mine, rep["qps"], strict=True):
                self._connect_rc(qp, psn, rq, rp, rep["gid"], rep["mtu"])
        self.remote = d
        self.last_connection = dict(
            conn_id=conn_id, initiator_nonce=ours, target_nonce=rep["target_nonce"], endpoint=ep
        )
        return d

    def send_cm(self, msg: bytes, endpoint: dict) -> None:
        """A raw CM datagram to a peer's connection manager (hostile tests)."""
        with self._lock:
            self._send_ud(msg, endpoint["gid"], endpoint["ud_qpn"], endpoint["qkey"])

    def rdma(
        self,
        opcode_name: str,
        local_offset: int,
        remote_addr: int,
        rkey: int,
        length: int,
        qp_index: int = 0,
        timeout: float = 30.0,
    ) -> None:
        from pyverbs.wr import SGE, SendWR

        opcode = getattr(self.e, opcode_name)
        wr_id = random.getrandbits(30) + 10000
        wr = SendWR(
            wr_id=wr_id,
            opcode=opcode,
            num_sge=1,
            sg=[SGE(self.mr.buf + local_offset, length, self.mr.lkey)],
            send_flags=self.e.IBV_SEND_SIGNALED,
        )
        wr.set_wr_rdma(rkey, remote_addr)
        with self._lock:
            self.rc[qp_index].post_send(wr)
        self._wait(wr_id, timeout)

    def send_notification(self, payload: bytes, qp_index: int = 0, timeout: float = 30.0) -> None:
        from pyverbs.wr import SGE, SendWR

        msg = struct.pack("<II", NOTE_MAGIC, len(payload)) + payload
        wr_id = random.getrandbits(30) + 10000
        with self._lock:
            self.send_mr.write(msg, len(msg), 0)
            wr = SendWR(
                wr_id=wr_id,
                opcode=self.e.IBV_WR_SEND,
                num_sge=1,
                sg=[SGE(self.send_mr.buf, len(msg), self.send_mr.lkey)],
                send_flags=self.e.IBV_SEND_SIGNALED,
            )
            self.rc[qp_index].post_send(wr)
        self._wait(wr_id, timeout)

    def _wait(self, wr_id: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while wr_id not in self.completions:
            if time.monotonic() > deadline:
                raise TimeoutError(f"work request {wr_id} did not complete")
            time.sleep(0.001)
        status = self.completions.pop(wr_id)
        if status != self.e.IBV_WC_SUCCESS:
            raise RuntimeError(f"work request failed with wc status {status}")

    def wait_notes(self, count: int, timeout: float) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(self.notes) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"received {len(self.notes)} of {count} notifications")
            time.sleep(0.005)
        return list(self.notes)
