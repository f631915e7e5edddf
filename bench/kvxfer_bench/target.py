"""The target side of a benchmark: owns the remote engine and its memory.

Started three ways, all speaking the protocol of ``proto.py``:
* ``python -m kvxfer_bench.target --connect HOST:PORT`` -- spawned by the initiator on the
  same host (it connects back to a loopback socket the initiator listens on);
* ``kvxfer-bench --listen PORT`` -- the second host of a two-host run (``serve``);
* a thread of the initiator's own process for ``--backend loopback``.

The target never drives transfers (they are one-sided); it registers memory, publishes
its descriptor, fills sources, poisons destinations and checksums them on request.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import traceback
from typing import Any

import numpy as np

from . import machine, proto, verify


class TargetSession:
    def __init__(self, sock: socket.socket, device: str = "", log=None):
        self.sock = sock
        self.device_override = device
        self.log = log or (lambda msg: print(f"kvxfer-bench target: {msg}", file=sys.stderr, flush=True))
        self.engine: Any = None
        self.regions: dict[str, tuple[np.ndarray, Any]] = {}  # key -> (buffer, Region)
        self.selections: dict[str, tuple[str, verify.Pieces]] = {}  # id -> (region key, pieces)
        self.peer_warning = ""
        self.done = False

    # -- commands ---------------------------------------------------------------------

    def cmd_setup(self, req: dict, blobs: list[bytes]) -> tuple[dict, list[bytes]]:
        import kvxfer

        from .engine_config import engine_config, local_host_of

        if req.get("protocol") != proto.PROTOCOL:
            raise proto.ProtocolError(
                f"protocol {req.get('protocol')} requested, this target speaks {proto.PROTOCOL}"
            )
        backend = req["backend"]
        avail = {b.name: b for b in kvxfer.list_backends()}
        if backend not in avail:
            raise ValueError(f"backend '{backend}' is not in this build (known: {', '.join(avail)})")
        if not avail[backend].available:
            raise ValueError(f"backend '{backend}' is unavailable here: {avail[backend].reason}")
        self.engine = kvxfer.Engine(
            req.get("name") or f"kvxfer-bench-target-{os.getpid()}",
            backends=[backend],
            config=engine_config(
                backend, self.device_override or req.get("device", ""), local_host_of(self.sock)
            ),
            threads=int(req.get("threads", 0)),
            timeout=float(req.get("timeout", 60.0)),
        )
        if blobs:
            # Not needed for one-sided transfers, but some transports may want to know the
            # initiator; a failure here is reported, not fatal.
            try:
                self.engine.add_peer(blobs[0])
            except Exception as e:  # noqa: BLE001
                self.peer_warning = f"target could not add the initiator as a peer: {e}"
        return {
            "describe": self.engine.describe_backends(),
            "machine": machine.info(),
            "pid": os.getpid(),
            "name": self.engine.name,
            "peer_warning": self.peer_warning,
        }, [self.engine.descriptor()]

    def cmd_region(self, req: dict, blobs: list[bytes]) -> tuple[dict, list[bytes]]:
        import kvxfer

        key = req["key"]
        if key in self.regions:
            self._free(key)
        nbytes = int(req["nbytes"])
        buf = verify.allocate(nbytes, req.get("memory", "numpy"))
        lay = req.get("layout")
        layout = kvxfer.KvLayout(**lay) if lay else None
        region = self.engine.register(buf, layout=layout)
        self.regions[key] = (buf, region)
        return {"region_id": region.id}, [self.engine.descriptor()]

    def cmd_free(self, req: dict, blobs: list[bytes]) -> tuple[dict, list[bytes]]:
        self._free(req["key"])
        return {}, [self.engine.descriptor()]

    def _free(self, key: str) -> None:
        buf, region = self.regions.pop(key)
        for sid in [s for s, (k, _) in self.selections.items() if k == key]:
            del self.selections[sid]
        try:
            self.engine.deregister(region)
        except Exception as e:  # noqa: BLE001
            self.log(f"deregister {key}: {e}")

    def cmd_select(self, req: dict, blobs: list[bytes]) -> tuple[dict, list[bytes]]:
        key = req["key"]
        buf, region = self.regions[key]
        if req["kind"] == "blocks":
            ids = proto.blob_array(blobs[0], np.int64)
            layers = tuple(req["layers"]) if req.get("layers") else None
            pieces = verify.block_pieces(_layout_dict(region.layout), ids, layers)
        else:
            ext = proto.blob_array(blobs[0], np.uint64).reshape(-1, 2)
            pieces = verify.extent_pieces(ext)
        if pieces.count and int((pieces.offsets + pieces.lengths).max()) > buf.size:
            raise ValueError("selection reaches past the region")
        self.selections[req["sel"]] = (key, pieces)
        return {"pieces": pieces.count, "bytes": pieces.nbytes}, []

    def cmd_fill(self, req: dict, blobs: list[bytes]) -> tuple[dict, list[bytes]]:
        """Fills a selection with the seed's pattern and returns its checksums."""
        buf, pieces = self._sel(req["sel"])
        verify.fill_pieces(buf, pieces, int(req["seed"]), int(req.get("stamp_stride", 256)))
        return {}, [proto.array_blob(verify.checksums(buf, pieces))]

    def cmd_poison(self, req: dict, blobs: list[bytes]) -> tuple[dict, list[bytes]]:
        buf, pieces = self._sel(req["sel"])
        verify.poison(buf, pieces, int(req["value"]) & 0xFF)
        return {}, []

    def cmd_checksum(self, req: dict, blobs: list[bytes]) -> tuple[dict, list[bytes]]:
        tag = req.get("wait_notify")
        waited = 0.0
        if tag:
            waited = self._wait_notification(tag.encode(), float(req.get("timeout", 60.0)))
        buf, pieces = self._sel(req["sel"])
        crcs = verify.checksums(buf, pieces)
        return {"notify_wait_s": waited}, [proto.array_blob(crcs)]

    def cmd_corrupt(self, req: dict, blobs: list[bytes]) -> tuple[dict, list[bytes]]:
        buf, pieces = self._sel(req["sel"])
        return {"offset": verify.corrupt(buf, pieces)}, []

    def cmd_drain(self, req: dict, blobs: list[bytes]) -> tuple[dict, list[bytes]]:
        return {"notifications": len(self.engine.notifications())}, []

    def cmd_ping(self, req: dict, blobs: list[bytes]) -> tuple[dict, list[bytes]]:
        return {"time": time.time()}, []

    def cmd_bye(self, req: dict, blobs: list[bytes]) -> tuple[dict, list[bytes]]:
        self.done = True
        return {}, []

    # -- helpers ----------------------------------------------------------------------

    def _sel(self, sel: str) -> tuple[np.ndarray, verify.Pieces]:
        key, pieces = self.selections[sel]
        return self.regions[key][0], pieces

    def _wait_notification(self, tag: bytes, timeout: float) -> float:
        t0 = time.monotonic()
        from kvxfer.errors import WaitTimeoutError

        try:
            self.engine.wait_notification(tag, timeout)
        except WaitTimeoutError:
            raise TimeoutError(f"notification {tag!r} did not arrive within {timeout} s") from None
        return time.monotonic() - t0

    def serve(self) -> int:
        """Answers requests until ``bye`` or the connection ends. Returns an exit code."""
        rc = 0
        try:
            while not self.done:
                try:
                    req, blobs = proto.recv(self.sock)
                except (proto.ProtocolError, ConnectionError, OSError) as e:
                    if self.engine is not None and not self.done:
                        self.log(f"control connection lost: {e}")
                        rc = 1
                    break
                handler = getattr(self, "cmd_" + str(req.get("cmd")), None)
                try:
                    if handler is None:
                        raise proto.ProtocolError(f"unknown command {req.get('cmd')!r}")
                    reply, rblobs = handler(req, blobs)
                    reply["ok"] = True
                except Exception as e:  # noqa: BLE001 - reported to the initiator
                    if os.environ.get("KVXFER_BENCH_DEBUG"):
                        traceback.print_exc()
                    reply, rblobs = {"ok": False, "error": str(e), "type": type(e).__name__}, []
                proto.send(self.sock, reply, rblobs)
        finally:
            self.close()
        return rc

    def close(self) -> None:
        for key in list(self.regions):
            self._free(key)
        if self.engine is not None:
            try:
                self.engine.close()
            except Exception:  # noqa: BLE001
                pass
            self.engine = None
        try:
            self.sock.close()
        except OSError:
            pass


def _layout_dict(layout: Any) -> dict:
    return {
        k: int(getattr(layout, k))
        for k in (
            "num_layers",
            "num_kv",
            "num_blocks",
            "block_bytes",
            "block_stride",
            "kv_stride",
            "layer_stride",
            "offset",
        )
    }


def listen(port: int, host: str = "", once: bool = False, device: str = "", ready=None) -> int:
    """``kvxfer-bench --listen``: serves initiators one at a time."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
    srv.listen(4)
    bound = srv.getsockname()[1]
    print(
        f"kvxfer-bench target: listening on {host or '*'}:{bound} (pid {os.getpid()})",
        file=sys.stderr,
        flush=True,
    )
    if ready:
        ready(bound)
    rc = 0
    try:
        while True:
            conn, addr = srv.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            print(f"kvxfer-bench target: session from {addr[0]}:{addr[1]}", file=sys.stderr, flush=True)
            rc = TargetSession(conn, device=device).serve()
            print(f"kvxfer-bench target: session from {addr[0]} ended", file=sys.stderr, flush=True)
            if once:
                return rc
    except KeyboardInterrupt:
        return 130
    finally:
        srv.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m kvxfer_bench.target",
        description="kvxfer-bench target process (normally started by kvxfer-bench itself)",
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--connect", metavar="HOST:PORT", help="connect back to an initiator")
    g.add_argument("--listen", metavar="[HOST:]PORT", help="wait for initiators")
    p.add_argument("--once", action="store_true", help="with --listen: exit after one session")
    p.add_argument("--device", default="", help="backend device on this side (overrides the initiator's)")
    a = p.parse_args(argv)
    if a.listen:
        host, port = proto.parse_hostport(a.listen)
        return listen(port, host, a.once, a.device)
    host, port = proto.parse_hostport(a.connect)
    sock = socket.create_connection((host, port), timeout=30)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return TargetSession(sock, device=a.device).serve()


if __name__ == "__main__":
    sys.exit(main())
