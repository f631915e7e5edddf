"""RDMA checks: devices, port state and MTU, GIDs, and the ibverbs backend itself (a real
engine on the device it would pick)."""

from __future__ import annotations

import glob
import os

from .context import Context
from .report import Check
from .verbs import query_ports


def _no_device(ctx: Context) -> Check:
    name = "rdma.devices"
    if ctx.needed("rdma"):
        return Check(
            name,
            "fail",
            f"no RDMA device ({ctx.ib_root} is empty or missing)",
            "load the NIC's RDMA driver (e.g. mlx5_ib), or create a soft-RoCE device "
            "(`rdma link add rxe0 type rxe netdev <interface>`; see the rdma.rxe row)",
        )
    return Check(name, "skip", f"no RDMA device ({ctx.ib_root} is empty or missing)")


def check_devices(ctx: Context) -> Check:
    if not ctx.devices:
        c = _no_device(ctx)
        if c.status == "skip":
            c.detail += ": the ibverbs backend is unavailable; shm and tcp do not need RDMA"
        return c
    parts = []
    for d in ctx.devices:
        how = d.driver or ("rdma_rxe" if d.name.startswith("rxe") else "?")
        on = f" on {d.parent}" if d.parent else ""
        parts.append(f"{d.name} ({how}{on}, {len(d.ports)} port{'s' if len(d.ports) != 1 else ''})")
    data = {"devices": [_device_data(d) for d in ctx.devices]}
    uverbs = sorted(glob.glob("/dev/infiniband/uverbs*"))
    data["uverbs"] = uverbs
    bad = "fail" if ctx.needed("rdma") else "warn"
    if not uverbs:
        return Check(
            "rdma.devices",
            bad,
            f"{', '.join(parts)}, but no /dev/infiniband/uverbs* character device: verbs cannot open them",
            "load ib_uverbs (`modprobe ib_uverbs`); in a container pass the devices "
            "(docker: --device /dev/infiniband/uverbs0 --device /dev/infiniband/rdma_cm)",
            data,
        )
    denied = [u for u in uverbs if not os.access(u, os.R_OK | os.W_OK)]
    if denied:
        return Check(
            "rdma.devices",
            bad,
            f"{', '.join(parts)}, but this user cannot open {', '.join(denied)} for reading and writing",
            "give the user access (rdma-core's udev rules make uverbs mode 0666; or add the user to the "
            "group owning the device)",
            data,
        )
    device_var, selector = ctx.env_value("backend.ibverbs.device")
    wanted = selector.split(":", 1)[0]
    if wanted and wanted not in [d.name for d in ctx.devices]:
        return Check(
            "rdma.devices",
            bad,
            f"{', '.join(parts)}; but {device_var}={selector!r} names no device here",
            f"unset {device_var} (kvxfer then picks the first ACTIVE port) or set it to one of "
            f"{', '.join(d.name for d in ctx.devices)}",
            data,
        )
    return Check("rdma.devices", "ok", ", ".join(parts), data=data)


def _device_data(d) -> dict[str, object]:
    return {
        "name": d.name,
        "driver": d.driver,
        "parent": d.parent,
        "node_type": d.node_type,
        "ports": [
            {
                "port": p.num,
                "state": p.state,
                "phys_state": p.phys_state,
                "link_layer": p.link_layer,
                "lid": p.lid,
                "netdev": p.netdev,
                "netdev_mtu": p.netdev_mtu,
                "active_mtu": p.active_mtu,
                "mtu_source": p.mtu_source,
                "gids": [{"index": g.index, "gid": g.text, "type": g.type, "ndev": g.ndev} for g in p.gids],
            }
            for p in d.ports
        ],
    }


def check_ports(ctx: Context) -> Check:
    if not ctx.devices:
        return Check("rdma.ports", "skip", "no RDMA device (see rdma.devices)")
    verbs = query_ports({d.name: [p.num for p in d.ports] for d in ctx.devices})
    rows, active, small, data = [], 0, [], []
    for d in ctx.devices:
        for p in d.ports:
            q = verbs.get((d.name, p.num))
            if q and q.get("active_mtu"):
                p.active_mtu, p.mtu_source = int(q["active_mtu"]), "ibv_query_port"
            mtu = f"MTU {p.active_mtu}" if p.active_mtu else "MTU ?"
            if p.mtu_source and p.mtu_source != "ibv_query_port":
                mtu += f" ({p.mtu_source})"
            elif p.netdev_mtu:
                mtu += f" ({p.netdev} MTU {p.netdev_mtu})"
            rows.append(f"{d.name}/{p.num} {p.state} {p.phys_state} {p.link_layer} {mtu}")
            active += p.state == "ACTIVE"
            if p.state == "ACTIVE" and p.active_mtu and p.active_mtu < 1024:
                small.append(f"{d.name}/{p.num} ({p.netdev or '?'})")
            data.append(
                {
                    "port": f"{d.name}/{p.num}",
                    "state": p.state,
                    "active_mtu": p.active_mtu,
                    "mtu_source": p.mtu_source,
                    "netdev_mtu": p.netdev_mtu,
                }
            )
    detail = "; ".join(rows)
    if not active:
        netdevs = sorted({p.netdev for d in ctx.devices for p in d.ports if p.netdev})
        return Check(
            "rdma.ports",
            "fail" if ctx.needed("rdma") else "warn",
            f"no ACTIVE port: {detail}",
            (
                f"bring the interface up (`ip link set {netdevs[0]} up`)"
                if netdevs
                else "check the cable and the subnet manager (InfiniBand: a running opensm)"
            ),
            {"ports": data},
        )
    if small:
        return Check(
            "rdma.ports",
            "warn",
            f"{detail}; small MTU on {', '.join(small)}",
            "raise the interface MTU (jumbo frames, e.g. `ip link set <if> mtu 9000` on every hop) "
            "for a 4096-byte RoCE MTU",
            {"ports": data},
        )
    return Check("rdma.ports", "ok", detail, data={"ports": data})


def check_gids(ctx: Context) -> Check:
    if not ctx.devices:
        return Check("rdma.gids", "skip", "no RDMA device (see rdma.devices)")
    rows, problems, fixes, data = [], [], [], []
    usable, forced_bad = 0, False  # ports kvxfer can use; a configured GID index that is absent
    gid_var, forced = ctx.env_value("backend.ibverbs.gid_index")
    for d in ctx.devices:
        for p in d.ports:
            if p.state != "ACTIVE":
                continue
            best = p.best_gid()
            name = f"{d.name}/{p.num}"
            data.append(
                {
                    "port": name,
                    "best_gid_index": best.index if best else None,
                    "best_gid": best.text if best else None,
                    "ipv4_mapped_v2": [g.index for g in p.gids if g.roce_v2 and g.ipv4],
                }
            )
            if not p.ethernet:
                if p.lid == 0:
                    problems.append(f"{name} has no LID")
                    fixes.append("start a subnet manager (opensm) on the fabric")
                else:
                    usable += best is not None
                rows.append(f"{name} InfiniBand LID {p.lid}, GID[0] {best.text if best else 'none'}")
                continue
            if best is None:
                problems.append(f"{name} has no GID")
                fixes.append(f"give {p.netdev or 'its interface'} an IPv4 address and bring it up")
                continue
            usable += 1
            mapped = [g for g in p.gids if g.roce_v2 and g.ipv4]
            if mapped:
                rows.append(f"{name} GID[{best.index}] {best.text} {best.type} (kvxfer picks it)")
            else:
                problems.append(
                    f"{name} has no IPv4-mapped RoCE v2 GID (kvxfer falls back to "
                    f"GID[{best.index}] {best.text} {best.type or ''}, same L2 segment only)"
                )
                fixes.append(
                    f"`ip addr add A.B.C.D/N dev {p.netdev or '<interface>'}`: the kernel then adds "
                    "the ::ffff:A.B.C.D RoCE v2 GID"
                )
            if forced:
                idx = int(forced) if forced.isdigit() else -1
                if idx not in [g.index for g in p.gids]:
                    forced_bad = True
                    problems.append(f"{gid_var}={forced} is not a populated GID index of {name}")
                    fixes.append(f"unset {gid_var} (kvxfer picks the best GID) or name a listed index")
    if not rows and not problems:
        return Check(
            "rdma.gids", "skip", "no ACTIVE port to read GIDs from (see rdma.ports)", data={"ports": data}
        )
    if problems:
        # Fatal only when no port has a GID kvxfer can use, or the configured index is absent;
        # a link-local fallback works within one L2 segment, so it only warns.
        status = "fail" if ctx.needed("rdma") and (usable == 0 or forced_bad) else "warn"
        return Check(
            "rdma.gids", status, "; ".join(rows + problems), "; ".join(dict.fromkeys(fixes)), {"ports": data}
        )
    return Check("rdma.gids", "ok", "; ".join(rows), data={"ports": data})


def check_ibverbs(ctx: Context) -> Check:
    """The ibverbs backend as kvxfer sees it: its availability, then a real engine on the
    device it picks, with a small registered region."""
    info = ctx.backends.get("ibverbs")
    if info is None or not info.available:
        reason = info.reason if info is not None else "this build lists no ibverbs backend"
        if ctx.needed("rdma"):
            return Check(
                "rdma.ibverbs",
                "fail",
                f"ibverbs backend unavailable: {reason}",
                "see the rdma.* rows above for what is missing",
                {"reason": reason},
            )
        status = "warn" if ctx.devices else "skip"
        return Check(
            "rdma.ibverbs", status, f"ibverbs backend unavailable: {reason}", data={"reason": reason}
        )
    import kvxfer

    try:
        with kvxfer.Engine("kvxfer-doctor", backends=["ibverbs"], connect_timeout=5.0) as eng:
            described = eng.describe_backends()
            buf = kvxfer.empty(1 << 20)
            eng.register(buf)
    except kvxfer.KvxferError as e:
        return Check(
            "rdma.ibverbs",
            "fail" if ctx.needed("rdma") else "warn",
            f"ibverbs is listed as available but an engine on it failed: {e}",
            "see memlock and rdma.* above; the message names the failing verbs call",
            {"error": str(e)},
        )
    return Check(
        "rdma.ibverbs", "ok", f"engine started, 1 MiB registered: {described}", data={"describe": described}
    )
