"""Where kvxfer listens: the tcp backend's bind address (TcpConfig.listen, whose overlay
variable is KVXFER_TCP_LISTEN (KVXFER_TCP_BIND before 0.2), else 127.0.0.1 on an ephemeral
port, loopback only unless configured (docs/security.md); native tcp_backend.cc), the IPv4
addresses its descriptor publishes, the shm backend's abstract socket, and ibverbs (no
socket: a UD queue pair on the chosen GID)."""

from __future__ import annotations

import ctypes
import ipaddress
import re
import socket

from .context import Context
from .report import Check

IFF_UP, IFF_LOOPBACK = 0x1, 0x8


class _Sockaddr(ctypes.Structure):
    _fields_ = [("sa_family", ctypes.c_ushort), ("sa_data", ctypes.c_ubyte * 14)]


class _Ifaddrs(ctypes.Structure):
    pass


_Ifaddrs._fields_ = [
    ("ifa_next", ctypes.POINTER(_Ifaddrs)),
    ("ifa_name", ctypes.c_char_p),
    ("ifa_flags", ctypes.c_uint),
    ("ifa_addr", ctypes.POINTER(_Sockaddr)),
    ("ifa_netmask", ctypes.POINTER(_Sockaddr)),
    ("ifa_ifu", ctypes.POINTER(_Sockaddr)),
    ("ifa_data", ctypes.c_void_p),
]


def ipv4_addresses() -> list[tuple[str, str]]:
    """(interface, address) of every IPv4 address on an UP interface, non-loopback
    first: the list the tcp backend publishes in its descriptor."""
    libc = ctypes.CDLL(None, use_errno=True)
    head = ctypes.POINTER(_Ifaddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        return []
    outer, loop = [], []
    try:
        node = head
        while node:
            i = node.contents
            if i.ifa_addr and i.ifa_addr.contents.sa_family == socket.AF_INET and i.ifa_flags & IFF_UP:
                addr = str(ipaddress.IPv4Address(bytes(i.ifa_addr.contents.sa_data[2:6])))
                item = ((i.ifa_name or b"?").decode(), addr)
                (loop if i.ifa_flags & IFF_LOOPBACK else outer).append(item)
            node = i.ifa_next
    finally:
        libc.freeifaddrs(head)
    return outer + (loop or [("lo", "127.0.0.1")])


def parse_bind(spec: str) -> tuple[str, int] | None:
    """The tcp backend's listen-address grammar: HOST:PORT, :PORT, HOST: or HOST, HOST an
    IPv4 literal, localhost, * or empty. None when malformed (the engine refuses it)."""
    host, _, port = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if host in ("", "*", "0.0.0.0"):
        host = "0.0.0.0"
    elif host == "localhost":
        host = "127.0.0.1"
    else:
        try:
            host = str(ipaddress.IPv4Address(host))
        except ValueError:
            return None
    if port and (not re.fullmatch(r"\d{1,5}", port) or int(port) > 65535):
        return None
    return host, int(port or 0)


def _ephemeral_range() -> str:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            lo, hi = f.read().split()
            return f"{lo}-{hi}"
    except (OSError, ValueError):
        return "?"


def check_listen(ctx: Context) -> Check:
    var, env = ctx.env_value("backend.tcp.listen")
    need = ctx.needed("tcp") or bool(env)
    bad = "fail" if need else "warn"
    addrs = ipv4_addresses()
    data: dict[str, object] = {"listen_variable": var, "listen_env": env or None}
    data["published"] = [a for _, a in addrs]
    shm = "shm: abstract unix socket @kvxfer-shm-<instance id> (no port)"
    ib = "ibverbs: no socket (a UD queue pair on the chosen GID)"
    if env:
        parsed = parse_bind(env)
        if parsed is None:
            return Check(
                "net.listen",
                "fail",
                f"{var}={env!r} is malformed: an engine with tcp refuses to start",
                "set it to HOST:PORT, :PORT or HOST with an IPv4 HOST (e.g. 0.0.0.0:5600), or unset it",
                data,
            )
        host, port = parsed
    else:
        host, port = "127.0.0.1", 0  # the default: loopback only (docs/security.md)
    data["bind"] = f"{host}:{port}"
    import kvxfer

    try:
        with kvxfer.Engine("kvxfer-doctor-tcp", backends=["tcp"]) as eng:
            described = eng.describe_backends()
    except kvxfer.KvxferError as e:
        text = str(e)
        if "in use" in text.lower():
            fix = f"port {port} is taken: stop the other listener or pick another ({var}=:PORT)"
        elif "assign" in text.lower():
            fix = f"{host} is not an address of this host: use one of {', '.join(a for _, a in addrs)}"
        elif "permission" in text.lower():
            fix = "ports below 1024 need CAP_NET_BIND_SERVICE: pick a port >= 1024"
        else:
            fix = f"see the message; {var} picks the address"
        data["error"] = text
        return Check(
            "net.listen",
            bad,
            f"tcp backend could not listen on {host}:{port}: {text}; {shm}; {ib}",
            fix,
            data,
        )
    m = re.search(r"listening on ([\d.]+):(\d+)", described)
    data["listened"] = f"{m.group(1)}:{m.group(2)}" if m else described
    where = f"{host}:{port}" if port else f"{host}, an ephemeral port ({_ephemeral_range()}; this run got "
    where += f"{m.group(2)})" if m and not port else ""
    published = ", ".join(a for _, a in addrs) if host == "0.0.0.0" else host
    detail = (
        f"tcp (off by default, Engine(backends=['tcp'])) listens on {where}; its descriptor publishes "
        f"{published}; {shm}; {ib}"
    )
    if all(ipaddress.IPv4Address(a).is_loopback for _, a in addrs) or ipaddress.IPv4Address(host).is_loopback:
        return Check(
            "net.listen",
            "warn" if not need else "fail",
            detail + "; only loopback: engines on other hosts cannot reach this one over tcp",
            f"tcp listens on loopback unless configured (docs/security.md): bind to this host's address "
            f"with {var}=ADDRESS:PORT (or 0.0.0.0:PORT), or bring up a non-loopback interface",
            data,
        )
    if not port:
        detail += f"; a firewall must admit that range, or pin a port with {var}=:PORT"
    return Check("net.listen", "ok", detail, data=data)
