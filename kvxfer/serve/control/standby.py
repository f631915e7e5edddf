"""The standby agent: runs inside a stateless worker (role ``standby``) until a controller
assigns it a role [paper: section 3.4, dynamic construction from stateless instances].

1. take a lease and register ``standby/<name>`` (``state: "waiting"``), renewed every ttl/3
   by a thread until :meth:`release` (also while the role loads);
2. wait for ``assign/<name>`` (written by a controller with compare-and-swap):
   ``{"role", "scenario", "group"}``;
3. the worker then loads the role in the same process and starts its member agent, which
   reports under the group like any worker; :meth:`release` then revokes the standby lease
   (``standby/<name>`` goes) and deletes the assignment.

A standby that dies before it reports as a member loses its lease: the claiming controller
sees ``standby/<name>`` gone without a member report and gives up on it (no wait until the
setup deadline).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from ..registry import RegistryError, open_registry
from . import keys

log = logging.getLogger("kvxfer.serve.control.standby")


class StandbyAgent:
    def __init__(self, registry: str, name: str, ttl_s: float = 2.0) -> None:
        self.reg = open_registry(registry)
        self.name, self.ttl_s = name, ttl_s
        self.lease = 0
        self._released = False
        self.lost = threading.Event()
        self._done = threading.Event()
        self._beat = threading.Thread(target=self._keepalive, name="standby-lease", daemon=True)

    def register(self) -> None:
        self.lease = self.reg.grant(self.ttl_s)
        self.reg.put(keys.standby(self.name), keys.dumps({"state": "waiting", "pid": os.getpid()}),
                     lease=self.lease)  # fmt: skip
        self._beat.start()

    def _keepalive(self) -> None:
        while not self._done.wait(self.ttl_s / 3):
            try:
                if not self.reg.keepalive(self.lease):
                    log.error("%s: standby lease lost", self.name)
                    self.lost.set()
                    return
            except RegistryError as e:  # the registry is briefly unreachable: retry
                log.warning("%s: registry: %s", self.name, e)

    def wait(self, stopped: Callable[[], bool]) -> dict[str, Any] | None:
        """Blocks until an assignment arrives; None when ``stopped()`` turns true or the lease
        is lost (then the process should exit)."""
        akey = keys.assignment(self.name)
        while not (stopped() or self.lost.is_set()):
            try:
                e = self.reg.get(akey)
                if e is not None:
                    return keys.loads(e.value)
            except RegistryError as ex:
                log.warning("%s: registry: %s", self.name, ex)
            self._done.wait(0.05)
        return None

    def release(self) -> None:
        """After the member report is written (or at exit): the standby record and the
        assignment go. Idempotent."""
        if self._released:
            return
        self._released = True
        self._done.set()
        if self._beat.is_alive():
            self._beat.join(5.0)
        try:
            self.reg.revoke(self.lease)
            self.reg.delete(keys.assignment(self.name))
        except RegistryError as e:
            log.warning("%s: releasing the standby keys: %s", self.name, e)
        self.reg.close()
