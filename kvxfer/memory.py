"""Turns user memory into what the core registers: (pointer, bytes, kind, device, owner).

Accepted: anything with the buffer protocol (numpy arrays, bytearray, mmap, memoryview),
torch tensors (CPU or CUDA), objects with ``__cuda_array_interface__`` (CuPy, Numba) and
DLPack producers. torch and cupy are never imported here: objects are inspected by duck
typing, so ``import kvxfer`` stays light.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _native
from .errors import InvalidArgumentError, UnsupportedError

MemoryKind = _native.MemoryKind

_DLPACK_CPU = 1
_DLPACK_CUDA = 2
_DLPACK_CUDA_HOST = 3


@dataclass(frozen=True)
class MemorySpan:
    ptr: int
    nbytes: int
    kind: Any  # MemoryKind
    device: int
    owner: Any  # kept alive as long as the registration


def _root_base(arr: np.ndarray) -> Any:
    base: Any = arr
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, memoryview):  # np.frombuffer keeps a view of the exporter
        base = base.obj
    return base


def _from_buffer(obj: Any) -> MemorySpan:
    try:
        view = memoryview(obj)
    except TypeError:
        raise InvalidArgumentError(
            f"cannot register a {type(obj).__name__}: not a buffer, tensor, CUDA array or DLPack object"
        ) from None
    if view.readonly:
        raise InvalidArgumentError(
            f"cannot register a read-only {type(obj).__name__}: peers may write into registered memory"
        )
    if not view.c_contiguous:
        raise InvalidArgumentError(
            f"cannot register a {type(obj).__name__} that is not C-contiguous: it is not one byte range"
        )
    if view.nbytes == 0:
        raise InvalidArgumentError("cannot register an empty buffer")
    arr = np.frombuffer(view, dtype=np.uint8)
    ptr = arr.__array_interface__["data"][0]
    kind = MemoryKind.HOST
    if isinstance(obj, np.ndarray) and isinstance(_root_base(obj), _native.HostBuffer):
        kind = MemoryKind.HOST_SHAREABLE
    return MemorySpan(ptr, view.nbytes, kind, -1, obj)


def _from_torch(t: Any) -> MemorySpan:
    if not t.is_contiguous():
        raise InvalidArgumentError("tensor is not C-contiguous: it is not one byte range")
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        raise InvalidArgumentError("cannot register an empty tensor")
    dev = t.device
    dev_type = getattr(dev, "type", None) or str(dev).split(":")[0]
    if dev_type == "cpu":
        return MemorySpan(t.data_ptr(), nbytes, MemoryKind.HOST, -1, t)
    if dev_type == "cuda":
        index = getattr(dev, "index", None)
        if index is None and ":" in str(dev):
            index = int(str(dev).split(":")[1])
        return MemorySpan(t.data_ptr(), nbytes, MemoryKind.CUDA, int(index or 0), t)
    raise UnsupportedError(f"tensor on {dev}: kvxfer registers host and CUDA memory only")


def _from_cuda_array_interface(obj: Any) -> MemorySpan:
    cai = obj.__cuda_array_interface__
    ptr, _ = cai["data"]
    shape = tuple(cai["shape"])
    itemsize = np.dtype(cai["typestr"]).itemsize
    strides = cai.get("strides")
    if strides is not None:
        expect = itemsize
        for dim, stride in zip(reversed(shape), reversed(strides), strict=True):
            if dim > 1 and stride != expect:
                raise InvalidArgumentError("CUDA array is not C-contiguous: it is not one byte range")
            expect *= dim
    nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
    if nbytes == 0:
        raise InvalidArgumentError("cannot register an empty CUDA array")
    return MemorySpan(int(ptr), nbytes, MemoryKind.CUDA, _cuda_device(int(ptr), obj), obj)


def _cuda_device(ptr: int, obj: Any) -> int:
    """The GPU holding ``ptr``: asked of the CUDA driver; where it cannot answer, the
    object's own ``device.id`` (CuPy), else 0 (registration then fails with the reason)."""
    if _native.cuda_status() == "":
        try:
            return int(_native.cuda_pointer_device(ptr))
        except Exception:  # noqa: BLE001 - registration reports what is wrong with the pointer
            pass
    return int(getattr(getattr(obj, "device", None), "id", 0) or 0)


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


def _from_dlpack_cuda(obj: Any) -> MemorySpan:
    """A CUDA DLPack producer: reads the DLTensor of an (unconsumed, legacy) capsule, which
    stays alive with the registration so the producer keeps the memory."""
    capsule = obj.__dlpack__()
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype = ctypes.c_void_p
    get.argtypes = [ctypes.py_object, ctypes.c_char_p]
    try:
        addr = get(capsule, b"dltensor")
    except ValueError:
        raise UnsupportedError("DLPack capsule is not a legacy 'dltensor' capsule") from None
    t = _DLTensor.from_address(addr)  # DLManagedTensor starts with its DLTensor
    if t.device.device_type != _DLPACK_CUDA:
        raise UnsupportedError(f"DLPack device type {t.device.device_type} is not CUDA")
    if t.dtype.lanes != 1 or t.dtype.bits % 8:
        raise InvalidArgumentError("DLPack tensor with vector lanes or sub-byte elements")
    itemsize = t.dtype.bits // 8
    shape = [t.shape[i] for i in range(t.ndim)]
    if t.strides:
        expect = 1
        for dim, i in zip(reversed(shape), reversed(range(t.ndim)), strict=True):
            if dim > 1 and t.strides[i] != expect:
                raise InvalidArgumentError("DLPack tensor is not C-contiguous: it is not one byte range")
            expect *= dim
    nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
    if nbytes == 0:
        raise InvalidArgumentError("cannot register an empty DLPack tensor")
    ptr = int(t.data or 0) + int(t.byte_offset)
    return MemorySpan(ptr, nbytes, MemoryKind.CUDA, int(t.device.device_id), (obj, capsule))


def as_span(obj: Any, kind: Any = None, device: int = -1) -> MemorySpan:
    """The registration span of ``obj`` (see the module docstring)."""
    if hasattr(obj, "data_ptr") and hasattr(obj, "element_size") and hasattr(obj, "device"):
        span = _from_torch(obj)
    elif hasattr(obj, "__cuda_array_interface__"):
        span = _from_cuda_array_interface(obj)
    elif hasattr(obj, "__dlpack_device__") and not isinstance(obj, np.ndarray):
        dev_type, dev_id = obj.__dlpack_device__()
        if dev_type in (_DLPACK_CPU, _DLPACK_CUDA_HOST):
            span = _from_buffer(np.from_dlpack(obj))
            span = MemorySpan(span.ptr, span.nbytes, span.kind, -1, obj)
        elif dev_type == _DLPACK_CUDA:
            span = _from_dlpack_cuda(obj)
        else:
            raise UnsupportedError(
                f"DLPack device type {dev_type} (device {dev_id}) has no pointer kvxfer can read here;"
                " pass a torch tensor, a __cuda_array_interface__ object or register_ptr()"
            )
    else:
        span = _from_buffer(obj)
    if kind is not None:
        span = MemorySpan(span.ptr, span.nbytes, kind, device if device >= 0 else span.device, span.owner)
    return span
