"""The member agent: runs inside each prefill or decode worker process (the paper's "LLM
Serving" resident process, in its part of the group setup) [paper: Fig. 6].

1. **report**: take a health lease and write ``members/<name>`` with the role, the URL and the
   worker's kvxfer descriptor (descriptors are exchanged through the registry);
2. wait for the controller's **initialize order** naming the group's members;
3. **connect and verify**: add every member of the other role as a kvxfer peer, then send it a
   ``kvx-hello`` notification until it answers ``kvx-ack`` (the answer proves that it knows us
   and that notifications pass both ways); unanswered peers are retried until ``verify_s``;
4. **load**: the worker loaded its model when its process started [inferred: the paper loads
   after connecting, because loading takes minutes there; here it takes well under a second],
   so the agent reports ``connected``, ``loaded`` and then
5. **healthy**, and keeps the lease alive every ``ttl/3`` (the periodic health report).

A later order (a member left or joined) is applied the same way: new peers are connected and
verified, departed ones forgotten. A prefill learns a new decode (``worker.on_peer``) only once
that decode has answered its ``kvx-hello``, i.e. once the decode knows the prefill: the decode
metadata reaches the prefills after the connection is confirmed [paper: dynamic construction].
If the lease is lost (the registry declared us dead), the agent calls ``on_lost`` (the worker
process exits: a removed member does not come back under the same name, exactly one
replacement takes its place).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from ..kv_transfer import NotificationRouter
from ..registry import Registry, RegistryError, open_registry
from . import keys

HELLO, ACK = b"kvx-hello", b"kvx-ack"
log = logging.getLogger("kvxfer.serve.control.member")


class MemberAgent:
    def __init__(
        self,
        worker: Any,
        registry: str | Registry,
        scenario: str,
        group: str,
        url: str,
        loop: asyncio.AbstractEventLoop,
        ttl_s: float = 2.0,
        verify_s: float = 20.0,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.worker = worker
        self.reg = open_registry(registry) if isinstance(registry, str) else registry
        self.scenario, self.group, self.url, self.loop = scenario, group, url, loop
        self.ttl_s, self.verify_s = ttl_s, verify_s
        self.on_lost = on_lost
        self.name: str = worker.name
        self.role: str = worker.role
        self.key = keys.member(scenario, group, self.name)
        self.peers: dict[str, dict[str, Any]] = {}  # connected: name -> member record
        self.acked: set[str] = set()
        self.epoch = 0
        self.lease = 0
        self._stop = threading.Event()
        router: NotificationRouter = worker.router
        router.on(HELLO, self._on_hello)
        router.on(ACK, self._on_ack)
        self._thread = threading.Thread(target=self._run, name="member-agent", daemon=True)

    # -- notifications (router thread) ----------------------------------------------------------
    def _on_hello(self, note: Any) -> None:
        if note.peer in self.peers:
            self.worker.engine.notify(
                self.worker.engine.peer(note.peer), ACK + b":" + self.name.encode(), 5.0
            )

    def _on_ack(self, note: Any) -> None:
        self.acked.add(note.peer)

    # -- the agent thread -----------------------------------------------------------------------
    def start(self) -> None:
        self.lease = self.reg.grant(self.ttl_s)
        self._report("reported")
        self._thread.start()

    def _report(self, state: str, message: str = "") -> None:
        rec = {"role": self.role, "url": self.url, "descriptor": self.worker.descriptor_b64(),
               "state": state, "epoch": self.epoch, "pid": os.getpid(), "message": message}  # fmt: skip
        self.reg.put(self.key, keys.dumps(rec), lease=self.lease)

    def _run(self) -> None:
        okey = keys.order(self.scenario, self.group)
        after = 0
        next_beat = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_beat:
                    if not self.reg.keepalive(self.lease):
                        log.error("%s: health lease lost; leaving", self.name)
                        if self.on_lost:
                            self.on_lost()
                        return
                    next_beat = time.monotonic() + self.ttl_s / 3
                entry = self.reg.get(okey)
                order = keys.loads(entry.value) if entry else None
                if order and order["epoch"] > self.epoch and self.name in order["members"]:
                    self._apply(order)
                if after == 0:
                    after = entry.mod_revision if entry else self.reg.revision()
                _, after = self.reg.events(okey, after, min(self.ttl_s / 3, 1.0))
            except RegistryError as e:  # the registry is briefly unreachable: retry
                log.warning("%s: registry: %s", self.name, e)
                self._stop.wait(0.2)

    def _apply(self, order: dict[str, Any]) -> None:
        want = {n: r for n, r in order["members"].items() if n != self.name and r != self.role}
        recs = {e.key.rsplit("/", 1)[1]: keys.loads(e.value)
                for e in self.reg.get_prefix(keys.members(self.scenario, self.group))}  # fmt: skip
        for gone in [n for n in self.peers if n not in want]:
            del self.peers[gone]
            self.acked.discard(gone)
            self._call_in_loop(self.worker.on_peer_gone, gone)
        new = [n for n in want if n not in self.peers]
        missing = [n for n in new if n not in recs]
        if missing:
            self._report("failed", f"order names members without a report: {missing}")
            return
        engine = self.worker.engine
        for n in new:
            rec = recs[n]
            engine.add_peer(base64.b64decode(rec["descriptor"]))
            self.peers[n] = rec
        deadline = time.monotonic() + self.verify_s
        while not self._stop.is_set():
            pending = [n for n in want if n not in self.acked]
            if not pending:
                break
            if time.monotonic() > deadline:
                self._report("failed", f"no kvx-ack from {pending} within {self.verify_s} s")
                return
            for n in pending:
                try:
                    engine.notify(engine.peer(n), HELLO + b":" + self.name.encode(), 2.0)
                except Exception as e:  # noqa: BLE001 - a peer not reachable yet: retry
                    log.info("%s: hello to %s: %s", self.name, n, e)
            self.reg.keepalive(self.lease)
            self._stop.wait(0.1)
        # only a verified peer is handed to the worker: its kvx-ack proves it added us, so a
        # prefill never sends a request to a decode that cannot yet read from it
        for n in new:
            self._call_in_loop(
                self.worker.on_peer, n, {"role": self.peers[n]["role"], "url": self.peers[n]["url"]}
            )
        self.epoch = order["epoch"]
        for state in ("connected", "loaded", "healthy"):
            self._report(state)

    def _call_in_loop(self, fn: Callable[..., None], *args: Any) -> None:
        done = threading.Event()

        def call() -> None:
            try:
                fn(*args)
            finally:
                done.set()

        self.loop.call_soon_threadsafe(call)
        done.wait(5.0)

    def stop(self) -> None:
        """Leaves the group cleanly: the lease is revoked, so the key goes at once."""
        self._stop.set()
        self._thread.join(5.0)
        try:
            self.reg.revoke(self.lease)
        except RegistryError:
            pass
        self.reg.close()
