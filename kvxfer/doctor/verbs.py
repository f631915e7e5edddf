"""Port attributes straight from libibverbs (ctypes): state and active MTU of every port.

Optional enrichment for the sysfs view (sysfs has no MTU for InfiniBand ports). Returns
{} when libibverbs cannot be loaded or lists no device; never raises.
"""

from __future__ import annotations

import ctypes

_MTU_BYTES = {1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096}
_PORT_STATES = {0: "NOP", 1: "DOWN", 2: "INIT", 3: "ARMED", 4: "ACTIVE", 5: "ACTIVE_DEFER"}


class _PortAttrPrefix(ctypes.Structure):
    # The first fields of struct ibv_port_attr (infiniband/verbs.h), stable since IBVERBS_1.0.
    _fields_ = [
        ("state", ctypes.c_int),
        ("max_mtu", ctypes.c_int),
        ("active_mtu", ctypes.c_int),
        ("gid_tbl_len", ctypes.c_int),
        ("port_cap_flags", ctypes.c_uint32),
        ("max_msg_sz", ctypes.c_uint32),
    ]


def query_ports(ports_of: dict[str, list[int]]) -> dict[tuple[str, int], dict[str, object]]:
    """{(device, port): {"state", "active_mtu", "max_mtu", "max_msg_sz"}} for the given ports."""
    try:
        lib = ctypes.CDLL("libibverbs.so.1", use_errno=True)
    except OSError:
        return {}
    lib.ibv_get_device_list.restype = ctypes.POINTER(ctypes.c_void_p)
    lib.ibv_get_device_list.argtypes = [ctypes.POINTER(ctypes.c_int)]
    lib.ibv_free_device_list.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    lib.ibv_get_device_name.restype = ctypes.c_char_p
    lib.ibv_get_device_name.argtypes = [ctypes.c_void_p]
    lib.ibv_open_device.restype = ctypes.c_void_p
    lib.ibv_open_device.argtypes = [ctypes.c_void_p]
    lib.ibv_close_device.argtypes = [ctypes.c_void_p]
    lib.ibv_query_port.argtypes = [ctypes.c_void_p, ctypes.c_uint8, ctypes.c_void_p]
    out: dict[tuple[str, int], dict[str, object]] = {}
    count = ctypes.c_int(0)
    devs = lib.ibv_get_device_list(ctypes.byref(count))
    if not devs:
        return {}
    try:
        for i in range(count.value):
            name = (lib.ibv_get_device_name(devs[i]) or b"").decode()
            if name not in ports_of:
                continue
            ctx = lib.ibv_open_device(devs[i])
            if not ctx:
                continue
            try:
                for port in ports_of[name]:
                    buf = ctypes.create_string_buffer(256)  # larger than any ibv_port_attr
                    if lib.ibv_query_port(ctx, port, buf) != 0:
                        continue
                    a = _PortAttrPrefix.from_buffer(buf)
                    out[(name, port)] = {
                        "state": _PORT_STATES.get(a.state, str(a.state)),
                        "active_mtu": _MTU_BYTES.get(a.active_mtu),
                        "max_mtu": _MTU_BYTES.get(a.max_mtu),
                        "max_msg_sz": a.max_msg_sz,
                    }
            finally:
                lib.ibv_close_device(ctx)
    finally:
        lib.ibv_free_device_list(devs)
    return out
