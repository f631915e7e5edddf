"""Device classes (prefill tokens/s, decode ms/token) loaded from ``profiles.json``.

Each class names the source of its figures or says they are assumed. The device runtime is
throttled to a class: real compute on a small model, then a sleep up to the time the class
would take, so the timeline is the phone's while the tokens are the model's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kvxfer.device.errors import BadSettingsError

_PATH = Path(__file__).with_name("profiles.json")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    prefill_tok_s: float
    absorb_tok_s: float
    decode_ms: float
    source: str = ""

    @property
    def tau_d(self) -> float:
        """Seconds per decode step."""
        return self.decode_ms / 1e3

    @property
    def c_d(self) -> float:
        """Seconds to absorb one cloud token by batched prefill."""
        return 1.0 / self.absorb_tok_s

    def prefill_s(self, tokens: int) -> float:
        return tokens / self.prefill_tok_s

    def scaled(self, speed: float) -> DeviceProfile:
        """The same class running ``speed`` times faster (drift, thermal throttling)."""
        return DeviceProfile(
            self.name,
            self.prefill_tok_s * speed,
            self.absorb_tok_s * speed,
            self.decode_ms / speed,
            self.source,
        )

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "prefill_tok_s": self.prefill_tok_s,
            "absorb_tok_s": self.absorb_tok_s,
            "decode_ms": self.decode_ms,
        }

    @classmethod
    def from_json(cls, d: dict) -> DeviceProfile:
        try:
            rates = (float(d["prefill_tok_s"]), float(d["absorb_tok_s"]), float(d["decode_ms"]))
            p = cls(str(d["name"]), *rates)
        except (KeyError, TypeError, ValueError) as e:
            raise BadSettingsError(f"bad device profile {d!r}: {e!r}") from e
        if min(p.prefill_tok_s, p.absorb_tok_s, p.decode_ms) <= 0:
            raise BadSettingsError(f"device profile {p.name!r} needs positive rates, got {d!r}")
        return p


def load_profiles(path: str | Path | None = None) -> dict[str, DeviceProfile]:
    data = json.loads(Path(path or _PATH).read_text())
    return {
        name: DeviceProfile(name, c["prefill_tok_s"], c["absorb_tok_s"], c["decode_ms"], c.get("source", ""))
        for name, c in data["classes"].items()
    }


def profile(name: str) -> DeviceProfile:
    classes = load_profiles()
    if name not in classes:
        raise BadSettingsError(f"unknown device class {name!r}; known: {', '.join(sorted(classes))}")
    return classes[name]
