"""Typed engine configuration: one dataclass per backend section, mirroring
``native/include/kvxfer/config.h`` field for field.

The environment overlay ``KVXFER_<SECTION>_<FIELD>`` (for example ``KVXFER_TCP_LISTEN``,
``KVXFER_IBVERBS_DEVICE``) is applied by the native engine on top of these values: the
environment wins, so an operator can retune a deployment without code changes.
:func:`environment_variables` lists every name.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from . import _native


@dataclass
class LoopbackConfig:
    threads: int = 1  # copy threads
    inline_max_bytes: int = 64 * 1024  # transfers up to this size run on the posting thread


@dataclass
class FaultConfig:
    # Faults to inject on the test backend "fault": e.g. "delay=5;fail@3=REMOTE;hang@4"
    # (native/src/backends/fault/README.md).
    script: str = ""


@dataclass
class ShmConfig:
    threads: int = 0  # copy threads; 0 = min(4, cores)
    inline_max_bytes: int = 64 * 1024  # transfers up to this size run on the posting thread


@dataclass
class TcpConfig:
    # "HOST:PORT", ":PORT", "HOST:" or "HOST" (IPv4 literal, "localhost" or "*");
    # "" = every interface, an ephemeral port.
    listen: str = ""
    inline_max_bytes: int = 64 * 1024  # transfers up to this size run on the posting thread
    # busy-poll (us) before sleeping for the next frame (listener, ACK wait); 0 = off
    spin_us: int = 50


@dataclass
class IbverbsConfig:
    device: str = ""  # "" = first device with an ACTIVE port; "rxe0" or "rxe0:GID_INDEX"
    gid_index: int = -1  # -1 = best RoCE v2 GID (IPv4-mapped first)
    port_num: int = 0  # 0 = first ACTIVE port
    qps_per_peer: int = 2
    sq_depth: int = 256
    recv_buffers: int = 64
    max_wr_bytes: int = 1 << 20
    ack_timeout: int = 15
    retry_cnt: int = 6  # not 7: rxe treats 7 as "retry forever"
    rnr_retry: int = 7
    traffic_class: int = 0
    service_level: int = 0
    spin_us: int = 20
    debug: bool = False


@dataclass
class BackendConfigs:
    loopback: LoopbackConfig = field(default_factory=LoopbackConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    shm: ShmConfig = field(default_factory=ShmConfig)
    tcp: TcpConfig = field(default_factory=TcpConfig)
    ibverbs: IbverbsConfig = field(default_factory=IbverbsConfig)


@dataclass
class EngineConfig:
    """Everything an engine is created from. ``backends`` lists the backends to start in
    order of preference (empty = every available backend that is on by default);
    ``timeout`` is the transfer deadline when a post names none; ``connect_timeout``
    bounds each backend attempt of ``add_peer``."""

    name: str = ""
    backends: list[str] = field(default_factory=list)
    timeout: float = 30.0
    connect_timeout: float = 10.0
    backend: BackendConfigs = field(default_factory=BackendConfigs)

    def to_native(self) -> _native.EngineConfig:
        from .errors import InvalidArgumentError

        c = _native.EngineConfig()
        if not isinstance(self.name, str):
            raise InvalidArgumentError(f"engine name must be a str, got {type(self.name).__name__}")
        try:
            self.name.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidArgumentError(f"engine name {self.name!r} is not valid UTF-8: {e}") from None
        c.name = self.name
        c.backends = list(self.backends)
        for label, value in (("timeout", self.timeout), ("connect_timeout", self.connect_timeout)):
            if not isinstance(value, (int, float)) or not value > 0:
                raise InvalidArgumentError(f"{label} must be a positive number of seconds, got {value!r}")
        c.default_timeout = _seconds(self.timeout)
        c.connect_timeout = _seconds(self.connect_timeout)
        sections = c.backend
        for section_name in ("loopback", "fault", "shm", "tcp", "ibverbs"):
            ours = getattr(self.backend, section_name)
            native = getattr(sections, section_name)
            for f in fields(ours):
                value = getattr(ours, f.name)
                try:
                    setattr(native, f.name, value)
                except TypeError as e:
                    raise InvalidArgumentError(
                        f"backend.{section_name}.{f.name}={value!r} has the wrong type: {e}"
                    ) from None
            setattr(sections, section_name, native)
        c.backend = sections
        return c


def _seconds(value: float):
    import datetime

    return datetime.timedelta(seconds=min(float(value), 1e9))


def environment_variables() -> list[tuple[str, str]]:
    """Every ``KVXFER_*`` variable of the configuration overlay and the field it sets."""
    return list(_native.environment_variables())
