"""P/D-Device: the cloud prefills and streams the first tokens, the device answers at once, a
speed controller paces the display until the device catches up, the prompt is refined during the
cloud's prefill, and a settings algorithm picks (n, rho) per request. See docs/pd-device.md.

Pure pieces (no torch): :mod:`.pacer`, :mod:`.timing`, :mod:`.sim`, :mod:`.settings`,
:mod:`.link`. Model-backed pieces (torch): :mod:`.lm`, :mod:`.refiner`, :mod:`.cloud`,
:mod:`.device`.
"""

from kvxfer.device.errors import (
    BadSettingsError,
    DeviceError,
    DeviceTimeoutError,
    LinkDownError,
    VersionMismatchError,
)

__all__ = ["BadSettingsError", "DeviceError", "DeviceTimeoutError", "LinkDownError", "VersionMismatchError"]
