"""A local P/D-Serve deployment: real worker processes on this host.

    with start_local(n_prefill=2, n_decode=1, backend="shm", model="tiny") as dep:
        dep.gateway_url, dep.prefill_urls, dep.decode_urls
        dep.kill("decode-0")        # SIGKILL one process (fault injection)

Each worker is ``python -m kvxfer.serve.worker CONFIG`` in its own session (a terminal's
Ctrl-C reaches only the parent, which stops the children in order). A worker whose parent
dies sees end of file on its stdin and exits. Start-up: every worker reports ready with its
URL and kvxfer descriptor; then every prefill and every decode exchange descriptors over
``POST /v1/peer`` (both directions); each worker answers ``GET /v1/status``; then the gateway
starts in front of the prefills (or of the aggregated workers).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..child_env import child_env
from .config import WorkerConfig
from .errors import ConfigError, WorkerStartError


@dataclass
class WorkerProcess:
    name: str
    role: str
    popen: subprocess.Popen
    log: Path
    url: str = ""
    descriptor: str = ""
    _ready: dict[str, Any] | None = None
    _reader: threading.Thread | None = field(default=None, repr=False)

    def start_reader(self) -> None:
        def read() -> None:
            assert self.popen.stdout is not None
            line = self.popen.stdout.readline()
            try:
                self._ready = json.loads(line) if line else {"ready": False, "error": "exited before ready"}
            except json.JSONDecodeError:
                self._ready = {"ready": False, "error": f"bad ready line {line[:200]!r}"}
            if self._ready.get("ready"):  # known without wait_ready (replacements spawned later)
                self.url = self._ready["url"]
                self.descriptor = self._ready.get("descriptor", "")
            for line in self.popen.stdout:  # drain; a standby prints a second line once assigned
                try:
                    again = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(again, dict) and again.get("ready"):
                    self.role = again.get("role", self.role)
                    self.url = again.get("url", self.url)
                    self.descriptor = again.get("descriptor", "")

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()

    def wait_ready(self, deadline: float) -> None:
        while self._ready is None:
            if time.monotonic() > deadline:
                raise WorkerStartError(f"{self.name} not ready in time; log: {self.tail()}")
            time.sleep(0.02)
        if not self._ready.get("ready"):
            raise WorkerStartError(
                f"{self.name} failed to start: {self._ready.get('error')}; log: {self.tail()}"
            )
        self.url = self._ready["url"]
        self.descriptor = self._ready.get("descriptor", "")

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None


def _post(url: str, body: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _get(url: str, timeout: float = 10.0) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class Deployment:
    """Worker processes started by :func:`start_local`; a context manager that stops them."""

    def __init__(self, log_dir: Path, remove_logs: bool = False) -> None:
        self.log_dir = log_dir
        self.remove_logs = remove_logs  # a temporary log folder goes away with the processes
        self.procs: dict[str, WorkerProcess] = {}
        self.gateway_url: str | None = None
        # control plane (registry=...): the registry, one controller per group, an own etcd
        self.registry: Any = None
        self.controllers: dict[str, Any] = {}
        self.etcd: Any = None
        self._base: WorkerConfig | None = None
        self._names = itertools.count()
        self.role_devices: dict[str, str] = {}
        # role -> (network namespace, address there): workers of that role start inside it
        self.role_netns: dict[str, tuple[str, str]] = {}
        self.retired: list[str] = []  # groups scaled in
        self.free_cpus: list[int] = []  # start_local(pin_cpus=True): CPUs no worker is pinned to

    def _urls(self, role: str) -> list[str]:
        return [p.url for p in self.procs.values() if p.role == role]

    @property
    def prefill_urls(self) -> list[str]:
        return self._urls("prefill")

    @property
    def decode_urls(self) -> list[str]:
        return self._urls("decode")

    @property
    def aggregated_urls(self) -> list[str]:
        return self._urls("aggregated")

    def spawn(self, cfg: WorkerConfig, prefix: list[str] | None = None) -> WorkerProcess:
        log = self.log_dir / f"{cfg.name}.log"
        env = child_env()
        with open(log, "wb") as err:
            popen = subprocess.Popen(
                [*(prefix or []), sys.executable, "-m", "kvxfer.serve.worker", cfg.to_json()],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                text=True,
                start_new_session=True,
            )
        wp = WorkerProcess(cfg.name, cfg.role, popen, log)
        wp.start_reader()
        self.procs[cfg.name] = wp
        return wp

    def spawn_member(self, group: str, role: str, **overrides: Any) -> str:
        """Starts one stateless worker that joins ``group`` through the registry (the
        controllers' ``spawn``); returns its name. ``overrides``: WorkerConfig fields."""
        assert self._base is not None
        ctl = self.controllers.get(group)
        scenario = ctl.scenario if ctl is not None else self._base.scenario
        name = f"{role}-{next(self._names)}"
        dev = self.role_devices.get(role, self._base.device)
        cfg = self._base.replace(role=role, name=name, port=0, group=group, scenario=scenario, device=dev)
        prefix: list[str] = []
        if role in self.role_netns:
            ns, addr = self.role_netns[role]
            cfg = cfg.replace(host=addr)
            prefix = ["ip", "netns", "exec", ns]
        self.spawn(cfg.replace(**overrides), prefix=prefix)
        return name

    def add_standby(self, count: int = 1, deadline: float | None = None) -> list[str]:
        """Starts ``count`` stateless standby workers (no model, no role) registered in the
        registry; the controllers assign them roles before spawning processes. Returns
        their names once they are registered."""
        assert self._base is not None and self.registry is not None, "standby workers need a registry"
        deadline = deadline if deadline is not None else time.monotonic() + 60.0
        procs = [self.spawn(self._base.replace(role="standby", name=f"standby-{next(self._names)}", port=0))
                 for _ in range(count)]  # fmt: skip
        for p in procs:
            p.wait_ready(deadline)
        return [p.name for p in procs]

    def add_group(self, scenario: str | None = None, n_prefill: int = 1, n_decode: int = 1,
                  **overrides: Any) -> str:  # fmt: skip
        """Scale out by one P/D group (registry deployments): its workers start, the setup
        workflow confirms them and only then routes to them. ``overrides``: WorkerConfig fields
        of the new workers (a rolling upgrade's new settings). Returns the group's name."""
        from .control.controller import GroupController

        assert self._base is not None and self.registry is not None, "add_group needs a registry deployment"
        group = f"g{len(self.controllers) + len(self.retired)}"
        ctl = GroupController(self.registry, scenario or self._base.scenario, group, n_prefill, n_decode,
                              spawn=lambda role: self.spawn_member(group, role, **overrides),
                              stop_member=self.stop_member, ttl_s=self._base.lease_ttl_s)  # fmt: skip
        self.controllers[group] = ctl
        for role, count in (("prefill", n_prefill), ("decode", n_decode)):
            for _ in range(count):
                self.spawn_member(group, role, **overrides)
        ctl.setup()
        ctl.watch()
        return group

    def drain(self, names: list[str], grace_s: float = 1.0, timeout_s: float = 120.0) -> None:
        """Waits until none of ``names`` holds a request: no busy slot, nothing queued or
        pending, no open stream; first ``grace_s`` for the gateways to apply a route change."""
        time.sleep(grace_s)
        deadline = time.monotonic() + timeout_s
        for n in names:
            while True:
                st = self.status(n)
                if not (st["busy"] or st["queued"] or st["open_streams"] or st.get("running")):
                    break
                if time.monotonic() > deadline:
                    raise WorkerStartError(f"{n} still busy after {timeout_s} s of draining: {st}")
                time.sleep(0.1)

    def retire_group(self, group: str) -> None:
        """Scale in by one group [paper]: its route goes first (no new traffic), its workers
        drain, then stop."""
        ctl = self.controllers.pop(group)
        ctl.retire(drain=self.drain)
        self.retired.append(group)

    def rolling_upgrade(self, **overrides: Any) -> list[str]:
        """Replaces every group, one at a time, by a group of the same ratio with ``overrides``
        (new worker settings): the new group is confirmed and routed before the old one is
        retired, so capacity never drops below the original [inferred: the paper takes one group
        down at a time]. Returns the new groups' names."""
        new = []
        for g in list(self.controllers):
            ctl = self.controllers[g]
            new.append(self.add_group(ctl.scenario, ctl.n_prefill, ctl.n_decode, **overrides))
            self.retire_group(g)
        return new

    def stop_member(self, name: str) -> None:
        """SIGTERM to one worker (it leaves its group cleanly), SIGKILL after 15 s."""
        p = self.procs[name]
        if p.alive:
            p.popen.send_signal(signal.SIGTERM)
            try:
                p.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(timeout=10)

    def status(self, name: str) -> dict[str, Any]:
        return _get(self.procs[name].url + "/v1/status")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Sends ``sig`` (default SIGKILL) to one worker and waits for it to end."""
        p = self.procs[name]
        if p.alive:
            p.popen.send_signal(sig)
        p.popen.wait(timeout=30)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to every process (gateway first), then SIGKILL to any left at the deadline."""
        for ctl in self.controllers.values():
            ctl.stop_watch()  # workers leaving now are not failures to repair
        order = sorted(self.procs.values(), key=lambda p: p.role != "gateway")
        for p in order:
            if p.alive:
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in order:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(timeout=10)
            for f in (p.popen.stdin, p.popen.stdout):
                if f is not None:
                    try:
                        f.close()
                    except OSError:
                        pass
        if self.registry is not None:
            self.registry.close()
        if self.etcd is not None:
            self.etcd.stop()
        if self.remove_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def physical_cores() -> list[list[int]]:
    """The CPUs this process may run on, grouped by physical core (hardware threads of one core
    together, from /sys/devices/system/cpu/cpuN/topology/thread_siblings_list; each CPU its own
    core where that file is missing), in order of their lowest CPU number."""
    allowed = sorted(os.sched_getaffinity(0))
    seen: dict[tuple[int, ...], list[int]] = {}
    for c in allowed:
        try:
            text = Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text()
            sib = set(_cpu_list(text))
        except (OSError, ValueError):
            sib = {c}
        key = tuple(sorted(sib & set(allowed)) or [c])
        seen.setdefault(key, list(key))
    return sorted(seen.values())


def _cpu_list(text: str) -> list[int]:
    """``"0-3,8,10-11"`` -> [0, 1, 2, 3, 8, 10, 11]."""
    out: list[int] = []
    for part in text.strip().split(","):
        if "-" in part:
            a, b = part.split("-")
            out += range(int(a), int(b) + 1)
        elif part:
            out.append(int(part))
    return out


def start_local(
    n_prefill: int = 1,
    n_decode: int = 1,
    backend: str = "shm",
    model: str = "tiny",
    mode: str = "real",
    policy: str = "reject-retry",
    b_p: int = 4,
    b_d: int = 8,
    *,
    n_aggregated: int = 0,
    gateway: bool = True,
    gateway_port: int = 0,
    host: str = "127.0.0.1",
    start_timeout: float = 180.0,
    log_dir: str | os.PathLike | None = None,
    registry: str = "",
    groups: int = 1,
    scenario: str | list[str] = "*",
    role_devices: dict[str, str] | None = None,
    role_netns: dict[str, tuple[str, str]] | None = None,
    standby: int = 0,
    pin_cpus: bool = False,
    **worker_options: Any,
) -> Deployment:
    """Starts ``n_prefill`` prefill + ``n_decode`` decode (+ ``n_aggregated`` aggregated)
    worker processes and a gateway; returns once all of them answer. ``worker_options`` are
    further :class:`WorkerConfig` fields (``transfer_mode``, ``max_prompt_tokens``, ``pending``,
    ``ttft_slo_s``, ...). Worker logs go to ``log_dir`` (kept), else to a temporary folder
    removed by ``stop()`` unless ``KVXFER_SERVE_KEEP_LOGS=1``. ``role_devices`` places a role's
    model and KV on a torch device (e.g. ``{"prefill": "cuda:0", "decode": "cuda:1"}``); the
    ``device`` option places every role. Raises :class:`WorkerStartError`
    (after stopping what started) when a process fails or is not ready by ``start_timeout``.

    ``registry``: "" (peers exchanged over HTTP by this function), or the control plane:
    ``"sqlite"`` (a registry file in the log folder), ``"sqlite:PATH"``, ``"etcd"`` (a private
    etcd server started here) or ``"etcd://HOST:PORT"``. Then ``groups`` P/D groups of
    ``n_prefill`` + ``n_decode`` workers each (group g serves ``scenario``, or ``scenario[g]``
    when it is a list) are set up by :mod:`kvxfer.serve.control`
    (report, initialize order, connect and verify, healthy, route), watched, and repaired.
    ``role_netns`` (registry deployments) starts a role's workers inside a network namespace,
    ``{"decode": ("ns-b", "10.0.0.2")}``: ``ip netns exec ns-b``, serving on that address (use
    ``backend="tcp"`` and a ``host`` the other namespace can reach). ``standby`` (registry
    deployments) starts that many stateless standby workers after the groups are confirmed:
    replacements and ``add_member`` turn them into prefills or decodes before starting new
    processes (docs/pd-serve-control.md, "Stateless workers").

    ``pin_cpus`` (direct deployments): each worker process runs on a physical core of its own
    (all of that core's hardware threads), prefills first, then decodes and aggregated
    workers, so that one instance's compute does not share a core with another's; the cores
    left over are in ``dep.free_cpus`` (for the gateways and load generators). Raises
    :class:`ConfigError` when there are fewer cores than workers."""
    if n_prefill < 0 or n_decode < 0 or n_aggregated < 0 or (n_prefill + n_aggregated) == 0:
        raise ConfigError("need at least one prefill or aggregated worker, and no negative counts")
    if n_prefill and not n_decode:
        raise ConfigError("prefill workers need at least one decode worker")
    if standby < 0 or (standby and not registry):
        raise ConfigError("standby workers need a registry deployment, and no negative count")
    base = WorkerConfig(backend=backend, model=model, mode=mode, policy=policy, b_p=b_p, b_d=b_d, host=host,
                        **worker_options)  # fmt: skip
    keep = bool(log_dir) or os.environ.get("KVXFER_SERVE_KEEP_LOGS", "") not in ("", "0")
    dep = Deployment(Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="kvxfer-serve-")), not keep)
    deadline = time.monotonic() + start_timeout
    if registry:
        if n_aggregated or not (n_prefill and n_decode) or groups < 1:
            raise ConfigError(
                "a registry deployment needs n_prefill >= 1, n_decode >= 1, groups >= 1, no aggregated"
            )
        dep.role_devices = dict(role_devices or {})
        dep.role_netns = dict(role_netns or {})
        try:
            _start_groups(dep, base, registry, groups, scenario, n_prefill, n_decode, deadline)
            if standby:
                dep.add_standby(standby, deadline)
            if gateway:
                g = dep.spawn(base.replace(role="gateway", name="gateway", port=gateway_port,
                                           registry=dep.registry.url))  # fmt: skip
                g.wait_ready(deadline)
                dep.gateway_url = g.url
                _get(g.url + "/health")
        except BaseException:
            dep.stop(timeout=5.0)
            raise
        return dep
    cores = physical_cores()
    if pin_cpus and len(cores) < n_prefill + n_decode + n_aggregated:
        dep.stop(timeout=1.0)
        raise ConfigError(
            f"pin_cpus: {len(cores)} physical cores for {n_prefill + n_decode + n_aggregated} workers"
        )
    used = 0
    try:
        for role, count in (("prefill", n_prefill), ("decode", n_decode), ("aggregated", n_aggregated)):
            for i in range(count):
                dev = (role_devices or {}).get(role, base.device)
                cpus = cores[used] if pin_cpus else []
                used += 1
                dep.spawn(base.replace(role=role, name=f"{role}-{i}", port=0, device=dev, cpus=cpus))
        if pin_cpus:
            dep.free_cpus = sorted(c for core in cores[used:] for c in core)
        for p in list(dep.procs.values()):
            p.wait_ready(deadline)
        prefills = [p for p in dep.procs.values() if p.role == "prefill"]
        decodes = [p for p in dep.procs.values() if p.role == "decode"]
        for pp in prefills:
            for dp in decodes:
                ans = _post(pp.url + "/v1/peer", {"v": 1, "descriptor": dp.descriptor, "role": "decode",
                                                  "name": dp.name, "url": dp.url})  # fmt: skip
                _post(dp.url + "/v1/peer", {"v": 1, "descriptor": ans["descriptor"], "role": "prefill",
                                            "name": pp.name, "url": pp.url})  # fmt: skip
        for p in dep.procs.values():
            dep.status(p.name)
        if gateway:
            fronts = dep.prefill_urls + dep.aggregated_urls
            gcfg = base.replace(role="gateway", name="gateway", port=gateway_port, prefill_urls=fronts)
            g = dep.spawn(gcfg)
            g.wait_ready(deadline)
            dep.gateway_url = g.url
            _get(g.url + "/health")
    except BaseException:
        dep.stop(timeout=5.0)
        raise
    return dep


def _start_groups(
    dep: Deployment, base: WorkerConfig, registry: str, groups: int, scenario: str | list[str], n_p: int,
    n_d: int, deadline: float,
) -> None:  # fmt: skip
    from .control.controller import GroupController
    from .registry import open_registry

    dep.log_dir.mkdir(parents=True, exist_ok=True)
    if registry == "sqlite":
        registry = f"sqlite:{dep.log_dir / 'registry.db'}"
    elif registry == "etcd":
        from .registry.server import EtcdServer

        dep.etcd = EtcdServer(host=base.host)
        registry = dep.etcd.url
    dep.registry = open_registry(registry)
    scenarios = [scenario] if isinstance(scenario, str) else list(scenario)
    dep._base = base.replace(registry=dep.registry.url, scenario=scenarios[0])
    for g in range(groups):
        group = f"g{g}"
        scen = scenarios[g % len(scenarios)]
        ctl = GroupController(dep.registry, scen, group, n_p, n_d, ttl_s=base.lease_ttl_s,
                              spawn=lambda role, group=group: dep.spawn_member(group, role),
                              stop_member=dep.stop_member,
                              setup_deadline_s=max(1.0, deadline - time.monotonic()))  # fmt: skip
        dep.controllers[group] = ctl
        for role, count in (("prefill", n_p), ("decode", n_d)):
            for _ in range(count):
                dep.spawn_member(group, role)
    for p in list(dep.procs.values()):
        p.wait_ready(deadline)
    for ctl in dep.controllers.values():
        ctl.setup_deadline_s = max(1.0, deadline - time.monotonic())
        ctl.setup()
        ctl.watch()
