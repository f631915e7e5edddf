"""Reads the RDMA devices of this host from sysfs (``/sys/class/infiniband``): ports,
their state, link layer, GID table (with RoCE type and netdev) and the netdev MTU.

Pure parsing: the roots are parameters so a unit test can point it at a small tree.
Nothing here opens a device; ``kvxfer.doctor.verbs`` does that for the active MTU.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

IB_ROOT = "/sys/class/infiniband"
NET_ROOT = "/sys/class/net"

# RoCE: the largest IB MTU that fits the netdev MTU after the RoCE v2 headers
# (GRH/IP 40 + UDP 8 + BTH 12 + extended headers + ICRC 4). The kernel's own margin is
# 80 (rxe) to 96 (iboe_get_mtu) bytes; 96 is the conservative one. [inferred from the
# kernel sources; the verbs query, when it works, gives the real value]
ROCE_HEADER_BYTES = 96
IB_MTUS = (4096, 2048, 1024, 512, 256)


def roce_mtu_for_netdev(netdev_mtu: int) -> int | None:
    for m in IB_MTUS:
        if m <= netdev_mtu - ROCE_HEADER_BYTES:
            return m
    return None


@dataclass
class Gid:
    index: int
    raw: str  # as sysfs prints it: 8 groups of 4 hex digits
    type: str | None  # "RoCE v2", "IB/RoCE v1", or None where sysfs has no type
    ndev: str | None

    @property
    def address(self) -> ipaddress.IPv6Address:
        return ipaddress.IPv6Address(self.raw)

    @property
    def is_zero(self) -> bool:
        return int(self.address) == 0

    @property
    def ipv4(self) -> str | None:
        mapped = self.address.ipv4_mapped
        return str(mapped) if mapped is not None else None

    @property
    def text(self) -> str:
        return f"::ffff:{self.ipv4}" if self.ipv4 else str(self.address)

    @property
    def roce_v2(self) -> bool:
        return (self.type or "").strip().lower() == "roce v2"


@dataclass
class Port:
    num: int
    state: str  # "ACTIVE", "DOWN", ...
    phys_state: str  # "LinkUp", "Disabled", ...
    link_layer: str  # "Ethernet" or "InfiniBand"
    lid: int
    rate: str
    gid_table_len: int
    gids: list[Gid] = field(default_factory=list)  # non-zero entries only
    netdev: str | None = None
    netdev_mtu: int | None = None
    active_mtu: int | None = None  # bytes; from verbs, else inferred from the netdev MTU
    mtu_source: str = ""

    @property
    def ethernet(self) -> bool:
        return self.link_layer.lower() == "ethernet"

    def best_gid(self) -> Gid | None:
        """The GID kvxfer's ibverbs backend picks (native/src/backends/ibverbs/device.h):
        RoCE: IPv4-mapped v2, other routable v2, link-local v2, then v1, lowest index
        among equals. InfiniBand: GID 0."""
        if not self.gids:
            return None
        if not self.ethernet:
            return next((g for g in self.gids if g.index == 0), None)

        def rank(g: Gid) -> tuple[int, int]:
            if g.roce_v2 and g.ipv4:
                return (0, g.index)
            if g.roce_v2 and not g.address.is_link_local:
                return (1, g.index)
            if g.roce_v2:
                return (2, g.index)
            return (3, g.index)

        return min(self.gids, key=rank)


@dataclass
class Device:
    name: str
    node_type: str
    driver: str | None
    parent: str | None  # rxe and siw name their netdev here
    ports: list[Port] = field(default_factory=list)

    @property
    def soft(self) -> bool:
        return self.name.startswith(("rxe", "siw")) or (self.driver or "") in ("rdma_rxe", "siw")


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:  # EINVAL for an unused GID's type, ENOENT for optional attributes
        return None


def _after_colon(text: str | None) -> str:
    """'4: ACTIVE' -> 'ACTIVE'."""
    if not text:
        return "?"
    return text.split(":", 1)[1].strip() if ":" in text else text


def _int(text: str | None, default: int = 0) -> int:
    try:
        return int(text or "", 0)
    except ValueError:
        return default


def _numbered(path: str) -> list[int]:
    try:
        return sorted(int(n) for n in os.listdir(path) if n.isdigit())
    except OSError:
        return []


def read_port(dev_dir: str, num: int) -> Port:
    p = os.path.join(dev_dir, "ports", str(num))
    indices = _numbered(os.path.join(p, "gids"))
    port = Port(
        num=num,
        state=_after_colon(_read(os.path.join(p, "state"))),
        phys_state=_after_colon(_read(os.path.join(p, "phys_state"))),
        link_layer=_read(os.path.join(p, "link_layer")) or "?",
        lid=_int(_read(os.path.join(p, "lid"))),
        rate=_read(os.path.join(p, "rate")) or "",
        gid_table_len=len(indices),
    )
    for i in indices:
        raw = _read(os.path.join(p, "gids", str(i)))
        if not raw:
            continue
        try:
            gid = Gid(
                i,
                raw,
                _read(os.path.join(p, "gid_attrs", "types", str(i))),
                _read(os.path.join(p, "gid_attrs", "ndevs", str(i))),
            )
            if gid.is_zero:
                continue
        except ValueError:  # not an IPv6-shaped string: skip the entry, keep the rest
            continue
        port.gids.append(gid)
    port.netdev = next((g.ndev for g in port.gids if g.ndev), None)
    return port


def read_devices(ib_root: str = IB_ROOT, net_root: str = NET_ROOT) -> list[Device]:
    """Every RDMA device under ``ib_root`` (empty when the directory is missing)."""
    try:
        names = sorted(os.listdir(ib_root))
    except OSError:
        return []
    out = []
    for name in names:
        d = os.path.join(ib_root, name)
        driver_link = os.path.join(d, "device", "driver")
        driver = os.path.basename(os.readlink(driver_link)) if os.path.islink(driver_link) else None
        dev = Device(
            name, _read(os.path.join(d, "node_type")) or "?", driver, _read(os.path.join(d, "parent"))
        )
        for num in _numbered(os.path.join(d, "ports")):
            port = read_port(d, num)
            if port.netdev is None and dev.parent and port.ethernet:
                port.netdev = dev.parent
            if port.netdev:
                port.netdev_mtu = _int(_read(os.path.join(net_root, port.netdev, "mtu")), 0) or None
            if port.ethernet and port.netdev_mtu:
                port.active_mtu = roce_mtu_for_netdev(port.netdev_mtu)
                port.mtu_source = f"inferred from {port.netdev} MTU {port.netdev_mtu}"
            dev.ports.append(port)
        out.append(dev)
    return out
