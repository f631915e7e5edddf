"""The group controller: the MLOps + ZooKeeper role of P/D-Serve for one P/D group
[paper: sections 3.3-3.4, Figs. 6-8], over any registry.

``setup()`` runs the group setup workflow:

1. write the group's spec; **collect** the members' reports until ``n_prefill`` prefills and
   ``n_decode`` decodes have reported (a member that has not reported by ``collect_s`` is
   replaced through ``spawn``, the retry, as long as the setup deadline allows);
2. write the **initialize order** (epoch 1: the members chosen);
3. wait until every member reports ``healthy`` for that epoch, i.e. it connected to and
   verified every peer of the other role (a member that fails or disappears is replaced and
   a new order written, within the deadline);
4. **confirm**: write the gateways' route ``<scenario, prefill urls>``: only now, and only
   with confirmed members, do gateways send requests to the group.

``watch()`` then keeps the group healthy: when a member's health lease expires (its process
died or hung: it stops renewing), the member is **logically removed** — its prefill URL leaves
the route at once, a new order without it tells the rest of the group — and **exactly one**
replacement of the same role is spawned, set up by the same workflow (the paper's dynamic
construction: the newcomer connects to the existing members, they confirm, it reports healthy,
the prefills learn the new decode from the order), then added to the route.

Removal bound: a dead member leaves the route within ``ttl_s + detect`` seconds, where
``detect`` is the registry's expiry latency (SQLite: one watch poll, 50 ms; etcd: its lease
checker, up to 0.5 s); :attr:`removals` records the measured delays.

``retire()`` is scale-in [paper]: remove the route first (no new traffic), wait until the
group's workers have no open request (drain), then stop them. ``add_members`` and
``remove_member`` change the ratio of a running group one instance at a time (gradual steps).

Stateless path [paper: dynamic construction]: wherever the controller needs one more prefill
or decode (a setup retry, a replacement, ``add_member``), it first claims a registered
**standby** worker (``standby/<name>``, see :mod:`.standby`) by writing its assignment with
compare-and-swap; the standby loads the role in its own process and joins by the same member
steps. Only when no standby is registered does it call ``spawn`` (a new process).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ServeError
from ..registry import Event, Registry, RegistryError, Watch
from . import keys

log = logging.getLogger("kvxfer.serve.control")


class GroupSetupError(ServeError, RuntimeError):
    """A group could not be set up (or repaired) before its deadline."""

    code = "SERVE_GROUP_SETUP"


@dataclass
class Removal:
    name: str
    role: str
    detected: float  # time.time() when the controller saw the lease expire
    routed_out: float  # when the route no longer named it (prefill) / the order was rewritten
    replacement: str = ""
    replaced: float = 0.0  # when the replacement was confirmed healthy (0: not yet)


@dataclass
class GroupController:
    """``spawn(role) -> name`` starts one stateless worker process that will report under this
    group (the deployment's job); ``stop_member(name)`` ends one. Both may be None (then
    missing members are only waited for)."""

    registry: Registry
    scenario: str
    group: str
    n_prefill: int
    n_decode: int
    spawn: Callable[[str], str] | None = None
    stop_member: Callable[[str], None] | None = None
    ttl_s: float = 2.0
    collect_s: float = 60.0
    setup_deadline_s: float = 180.0
    auto_replace: bool = True
    use_standby: bool = True  # claim a registered standby before spawning a process
    epoch: int = 0
    members: dict[str, str] = field(default_factory=dict)  # name -> role, in the current order
    removals: list[Removal] = field(default_factory=list)
    spawned: list[str] = field(default_factory=list)  # every name this controller spawned or claimed
    claimed: list[str] = field(default_factory=list)  # the standbys among them
    _watch: Watch | None = None
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        if self.n_prefill < 1 or self.n_decode < 1:
            raise GroupSetupError("a group needs at least one prefill and one decode")

    # -- reading ---------------------------------------------------------------------------
    def reports(self) -> dict[str, dict[str, Any]]:
        prefix = keys.members(self.scenario, self.group)
        return {e.key[len(prefix) :]: keys.loads(e.value) for e in self.registry.get_prefix(prefix)}

    def route(self) -> list[str]:
        e = self.registry.get(keys.routes(self.scenario, self.group))
        return keys.loads(e.value)["prefills"] if e else []

    # -- writing ---------------------------------------------------------------------------
    def _write_order(self) -> None:
        self.epoch += 1
        self.registry.put(keys.order(self.scenario, self.group),
                          keys.dumps({"epoch": self.epoch, "members": self.members}))  # fmt: skip

    def _write_route(self, reports: dict[str, dict[str, Any]] | None = None) -> None:
        reports = reports if reports is not None else self.reports()
        urls = [reports[n]["url"] for n, r in sorted(self.members.items()) if r == "prefill" and n in reports]
        self.registry.put(
            keys.routes(self.scenario, self.group), keys.dumps({"epoch": self.epoch, "prefills": urls})
        )

    def _claim_standby(self, role: str) -> str | None:
        """Assigns ``role`` in this group to one waiting standby; its name, or None."""
        job = keys.dumps({"role": role, "scenario": self.scenario, "group": self.group})
        for e in self.registry.get_prefix(keys.STANDBY):
            name = e.key[len(keys.STANDBY) :]
            if self.registry.cas(keys.assignment(name), 0, job):  # 0: only if nobody claimed it
                log.info("group %s: standby %s assigned the %s role", self.group, name, role)
                self.claimed.append(name)
                return name
        return None

    def _spawn(self, role: str) -> str | None:
        name = self._claim_standby(role) if self.use_standby else None
        if name is None:
            if self.spawn is None:
                return None
            name = self.spawn(role)
        self.spawned.append(name)
        return name

    def _lost_standby(self, name: str) -> bool:
        """A claimed standby whose record went without a member report (it died while
        loading). The standby key is read before the reports: a standby writes its member
        report before it drops that key."""
        if name not in self.claimed or self.registry.get(keys.standby(name)) is not None:
            return False
        if name in self.reports():
            return False
        self.registry.delete(keys.assignment(name))
        return True

    # -- setup -----------------------------------------------------------------------------
    def setup(self) -> float:
        """Runs the setup workflow; returns its duration (s). Raises :class:`GroupSetupError`."""
        t0 = time.monotonic()
        deadline = t0 + self.setup_deadline_s
        self.registry.put(keys.spec(self.scenario, self.group),
                          keys.dumps({"n_prefill": self.n_prefill, "n_decode": self.n_decode}))  # fmt: skip
        with self._lock:
            self._collect(deadline)
            self._write_order()
            self._await_healthy(set(self.members), deadline)
            self._write_route()
        log.info("group %s/%s confirmed at epoch %d", self.scenario, self.group, self.epoch)
        return time.monotonic() - t0

    def _collect(self, deadline: float) -> None:
        want = {"prefill": self.n_prefill, "decode": self.n_decode}
        retry_at = time.monotonic() + self.collect_s
        while True:
            reps = self.reports()
            by_role = {r: sorted(n for n, v in reps.items() if v["role"] == r and v["state"] != "failed")
                       for r in want}  # fmt: skip
            if all(len(by_role[r]) >= want[r] for r in want):
                self.members = {n: r for r in want for n in by_role[r][: want[r]]}
                return
            now = time.monotonic()
            if now > deadline:
                got = {r: len(by_role[r]) for r in want}
                raise GroupSetupError(
                    f"group {self.group}: collected {got} of {want} reports by the deadline"
                )
            if now > retry_at and self.spawn is not None:
                for r in want:
                    for _ in range(want[r] - len(by_role[r])):
                        log.warning("group %s: a %s did not report in time; spawning another", self.group, r)
                        self._spawn(r)
                retry_at = now + self.collect_s
            time.sleep(0.05)

    def _await_healthy(self, names: set[str], deadline: float) -> None:
        """Waits until every one of ``names`` (in the order) reports healthy at the current
        epoch. A member that failed or vanished is dropped from the order, one of its role
        is spawned, and the order rewritten when it reports."""
        waiting: dict[str, str] = {}  # spawned replacement -> role, not yet in the order
        while True:
            reps = self.reports()
            bad = [n for n in self.members if n not in reps or reps[n]["state"] == "failed"]
            for n in bad:
                role = self.members.pop(n)
                names.discard(n)
                log.warning("group %s: member %s %s; replacing it", self.group, n,
                            "failed: " + reps[n].get("message", "") if n in reps else "is gone")  # fmt: skip
                new = self._spawn(role)
                if new is None:
                    raise GroupSetupError(f"group {self.group}: member {n} failed and nothing can replace it")
                waiting[new] = role
            joined = [n for n in waiting if n in reps and reps[n]["state"] != "failed"]
            for n in joined:
                self.members[n] = waiting.pop(n)
                names.add(n)
            if bad or joined:
                self._write_order()
                continue
            if not waiting and all(
                reps[n]["state"] == "healthy" and reps[n]["epoch"] == self.epoch for n in names
            ):
                return
            if time.monotonic() > deadline:
                late = sorted(n for n in names if reps.get(n, {}).get("epoch") != self.epoch) + sorted(
                    waiting
                )
                raise GroupSetupError(f"group {self.group}: members {late} not healthy by the deadline")
            time.sleep(0.05)

    # -- health and recovery -----------------------------------------------------------------
    def watch(self) -> None:
        """Starts watching the members' leases (see the module docstring)."""
        self._watch = Watch(
            self.registry, keys.members(self.scenario, self.group), self._on_events, poll_s=0.25
        )

    def _on_events(self, events: list[Event]) -> None:
        prefix = keys.members(self.scenario, self.group)
        for ev in events:
            name = ev.key[len(prefix) :]
            if ev.type == "delete" and name in self.members:
                self._remove(name, detected=time.time())

    def _remove(self, name: str, detected: float) -> None:
        with self._lock:
            role = self.members.pop(name, None)
            if role is None:
                return
            self._write_route()  # a prefill leaves the gateways' table first
            self._write_order()  # then the group is told
            rm = Removal(name, role, detected, time.time())
            self.removals.append(rm)
            log.warning("group %s: %s %s removed (lease expired)", self.group, role, name)
            if not self.auto_replace:
                return
            new = self._spawn(role)
            if new is None:
                return
            rm.replacement = new
            try:
                deadline = time.monotonic() + self.setup_deadline_s
                self._join(new, role, deadline)
                rm.replaced = time.time()
            except (GroupSetupError, RegistryError) as e:
                log.error("group %s: replacement %s failed: %s", self.group, new, e)

    def _join(self, name: str, role: str, deadline: float) -> None:
        """Dynamic construction of one newcomer: wait for its report, order it in, wait until
        it and every existing member are healthy at the new epoch, then route to it."""
        while name not in self.reports():
            if self._lost_standby(name):
                raise GroupSetupError(f"group {self.group}: standby {name} died before it reported")
            if time.monotonic() > deadline:
                raise GroupSetupError(f"group {self.group}: {name} did not report by the deadline")
            time.sleep(0.05)
        self.members[name] = role
        self._write_order()
        self._await_healthy(set(self.members), deadline)
        self._write_route()

    def add_member(self, role: str) -> str:
        """Scale the group by one instance of ``role`` (a ratio step); returns its name."""
        with self._lock:
            name = self._spawn(role)
            if name is None:
                raise GroupSetupError("add_member needs a spawn callback")
            self._join(name, role, time.monotonic() + self.setup_deadline_s)
            return name

    def remove_member(self, name: str, drain: Callable[[str], None] | None = None) -> None:
        """Take one member out without dropping requests: out of the route and the order
        first, then ``drain(name)`` (wait for its open requests), then stop it."""
        with self._lock:
            self.members.pop(name, None)
            self._write_route()
            self._write_order()
        if drain is not None:
            drain(name)
        if self.stop_member is not None:
            self.stop_member(name)

    def retire(self, drain: Callable[[list[str]], None] | None = None) -> None:
        """Scale-in of the whole group: route removed first, then drain, then stop."""
        self.stop_watch()
        self.registry.delete(keys.routes(self.scenario, self.group))
        names = list(self.members)
        if drain is not None:
            drain(names)
        self.registry.delete(keys.order(self.scenario, self.group))
        self.registry.delete(keys.spec(self.scenario, self.group))
        if self.stop_member is not None:
            for n in names:
                self.stop_member(n)
        self.members = {}

    def stop_watch(self) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
