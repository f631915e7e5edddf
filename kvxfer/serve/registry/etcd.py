"""etcd v3 registry, for clusters: talks to etcd's JSON gRPC gateway (``/v3/...``) over HTTP.

Why not a gRPC client library [our choice, see docs/pd-serve-control.md]: the gateway ships
with every etcd >= 3.3 (Debian 12's ``etcd-server`` is 3.4) and needs only the standard
library: no grpcio or protobuf dependency, and the calls stay synchronous like the other
backends'. Keys and values
travel base64-encoded; 64-bit numbers as JSON strings. etcd rounds a lease TTL up to whole
seconds (and to its minimum TTL). Watches use the streaming ``/v3/watch`` endpoint.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import threading
import time
import urllib.parse
from typing import Any

from .base import Entry, Event, Registry, RegistryError


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _unb64(s: str | None) -> str:
    return base64.b64decode(s or "").decode()


def _prefix_end(prefix: str) -> str:
    b = bytearray(prefix.encode())
    while b and b[-1] == 0xFF:
        b.pop()
    if not b:
        return _b64(b"\0")  # the whole key space
    b[-1] += 1
    return _b64(bytes(b))


class EtcdRegistry(Registry):
    """``EtcdRegistry("etcd://127.0.0.1:2379")``; ``timeout_s`` bounds every unary call."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        u = urllib.parse.urlsplit(url if "://" in url else "etcd://" + url)
        if u.scheme not in ("etcd", "http") or not u.hostname:
            raise RegistryError(f"bad etcd address {url!r}; expected etcd://HOST:PORT")
        self.host, self.port = u.hostname, u.port or 2379
        self.url = f"etcd://{self.host}:{self.port}"
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._conns: list[http.client.HTTPConnection] = []  # every thread's, closed by close()
        self._conns_lock = threading.Lock()
        self.revision()  # fail now, with a clear error, if etcd is not there

    # -- transport ---------------------------------------------------------------------------
    def _conn(self) -> http.client.HTTPConnection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            self._local.conn = c
            with self._conns_lock:
                self._conns.append(c)
        return c

    def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        for attempt in (0, 1):  # one retry on a stale keep-alive connection
            c = self._conn()
            try:
                c.request("POST", path, data, {"Content-Type": "application/json"})
                r = c.getresponse()
                text = r.read()
            except (OSError, http.client.HTTPException) as e:
                c.close()
                self._local.conn = None
                with self._conns_lock:
                    self._conns.remove(c)
                if attempt:
                    raise RegistryError(f"etcd {self.url}{path}: {type(e).__name__}: {e}") from e
                continue
            if r.status != 200:
                raise RegistryError(f"etcd {self.url}{path} answered {r.status}: {text[:300]!r}")
            out = json.loads(text)
            if "error" in out:
                raise RegistryError(f"etcd {self.url}{path}: {out.get('error')}")
            return out
        raise AssertionError("unreachable")

    @staticmethod
    def _entry(kv: dict[str, Any]) -> Entry:
        return Entry(_unb64(kv["key"]), _unb64(kv.get("value")), int(kv.get("mod_revision", 0)),
                     int(kv.get("lease", 0)))  # fmt: skip

    # -- the interface -----------------------------------------------------------------------
    def put(self, key: str, value: str, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        try:
            return int(self._call("/v3/kv/put", body)["header"]["revision"])
        except RegistryError as e:
            if "lease not found" in str(e):
                raise RegistryError(f"lease {lease} does not exist (expired or revoked)") from e
            raise

    def get(self, key: str) -> Entry | None:
        kvs = self._call("/v3/kv/range", {"key": _b64(key)}).get("kvs", [])
        return self._entry(kvs[0]) if kvs else None

    def get_prefix(self, prefix: str) -> list[Entry]:
        out = self._call("/v3/kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix)})
        return sorted((self._entry(kv) for kv in out.get("kvs", [])), key=lambda e: e.key)

    def delete(self, key: str) -> bool:
        return int(self._call("/v3/kv/deleterange", {"key": _b64(key)}).get("deleted", 0)) > 0

    def cas(self, key: str, expected: int, value: str, lease: int = 0) -> bool:
        put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            put["lease"] = str(lease)
        cmp = {"target": "MOD", "key": _b64(key), "mod_revision": str(expected), "result": "EQUAL"}
        try:
            out = self._call("/v3/kv/txn", {"compare": [cmp], "success": [{"request_put": put}]})
        except RegistryError as e:
            if "lease not found" in str(e):
                raise RegistryError(f"lease {lease} does not exist (expired or revoked)") from e
            raise
        return bool(out.get("succeeded", False))

    def grant(self, ttl_s: float) -> int:
        if ttl_s <= 0:
            raise RegistryError(f"lease ttl must be > 0, got {ttl_s}")
        return int(self._call("/v3/lease/grant", {"TTL": str(math.ceil(ttl_s))})["ID"])

    def keepalive(self, lease: int) -> bool:
        out = self._call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(out.get("result", {}).get("TTL", 0)) > 0

    def revoke(self, lease: int) -> None:
        try:
            self._call("/v3/lease/revoke", {"ID": str(lease)})
        except RegistryError as e:
            if "lease not found" not in str(e):
                raise

    def revision(self) -> int:
        out = self._call("/v3/kv/range", {"key": _b64("\0"), "count_only": True})
        return int(out["header"]["revision"])

    def events(self, prefix: str, after: int, timeout_s: float) -> tuple[list[Event], int]:
        """One streaming watch from ``after + 1``, read until the first batch of events or the
        timeout; then closed (a long poll)."""
        req = {"create_request": {"key": _b64(prefix), "range_end": _prefix_end(prefix),
                                  "start_revision": str(after + 1)}}  # fmt: skip
        deadline = time.monotonic() + timeout_s
        c = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        try:
            c.request("POST", "/v3/watch", json.dumps(req).encode(), {"Content-Type": "application/json"})
            r = c.getresponse()
            if r.status != 200:
                raise RegistryError(f"etcd {self.url}/v3/watch answered {r.status}")
            # Without events, resume from ``after`` again: the header revision of the creation
            # answer may already include events that this stream had no time to deliver.
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return [], after
                assert c.sock is not None
                c.sock.settimeout(left)
                try:
                    line = r.readline()
                except TimeoutError:
                    return [], after
                if not line:
                    raise RegistryError(f"etcd {self.url} closed the watch stream")
                msg = json.loads(line)
                if "error" in msg:
                    raise RegistryError(f"etcd watch: {msg['error']}")
                res = msg.get("result", {})
                if int(res.get("compact_revision", 0)):
                    raise RegistryError(f"revision {after} was compacted in etcd")
                evs = []
                for ev in res.get("events", []):
                    kv = ev["kv"]
                    r_ = int(kv.get("mod_revision", 0))
                    typ = "delete" if ev.get("type") == "DELETE" else "put"
                    evs.append(Event(typ, _unb64(kv["key"]), _unb64(kv.get("value")), r_))
                if evs:
                    # the header revision may be past these events; resume after the last one
                    return evs, max(e.revision for e in evs)
        except (OSError, http.client.HTTPException) as e:
            raise RegistryError(f"etcd {self.url}/v3/watch: {type(e).__name__}: {e}") from e
        finally:
            c.close()

    def close(self) -> None:
        with self._conns_lock:
            for c in self._conns:
                c.close()
            self._conns.clear()
