"""The speed controller of P/D-Device: a display pacer over cloud tokens, then device tokens.

[paper] (abstract): the cloud's tokens after the first are shown through a speed controller so
that TPOT looks smooth until the device catches up; the device then decodes on its own; the
maximum displayed TPOT is tens of milliseconds.
[inferred] (research notes 2.4, our reconstruction): at each display the interval is
``delta = clamp((T_catch_estimate - last_shown) / tokens_left, delta_min, theta)`` where
``tokens_left`` counts the tokens still to show up to and including the device's first token
(index ``H`` = the handoff index, i.e. the number of cloud tokens the device absorbs). A token is
never shown before it arrives (``due = max(arrived, last_shown + delta)``). Spreading the cloud
tokens evenly up to the estimated catch-up time leaves no gap at the handoff when the estimate
holds. When even ``theta`` spacing cannot cover the time to catch-up, :meth:`Pacer.shortfall`
says how many more cloud tokens to ask for; when the device decodes slower than ``theta``
(``tau_d > theta``), :func:`cloud_must_finish` says to let the cloud finish the answer.

The pacer is pure: it never reads a clock. Every input carries its time, so it runs the same
under the real device runtime and under the simulator's or a test's fake clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvxfer.device.errors import BadSettingsError

CLOUD = "cloud"
DEVICE = "device"


@dataclass(frozen=True)
class ShownToken:
    index: int
    token_id: int
    source: str  # CLOUD | DEVICE
    arrived: float
    shown: float
    due: float  # when the pacer planned to show it (``shown`` minus the display's lateness)


def cloud_must_finish(tau_d: float, theta: float) -> bool:
    """True when a device decode step is longer than the TPOT cap: the device can never keep
    the pace after a handoff, so the cloud should stream the rest of the answer."""
    return tau_d > theta


class Pacer:
    """Releases tokens for display. Indices are answer positions (0 = first token).

    ``handoff`` is the expected index of the device's first token (the cloud quota n) until
    :meth:`fix_handoff` fixes it; ``t_catch`` is the estimated time that token is ready.
    """

    def __init__(self, theta: float, delta_min: float, handoff: int, t_catch: float | None = None) -> None:
        if not (theta > 0 and 0 <= delta_min <= theta):
            raise BadSettingsError(
                f"pacer needs 0 <= delta_min <= theta, theta > 0; got {delta_min}, {theta}"
            )
        if handoff < 1:
            raise BadSettingsError(f"handoff index must be >= 1 (the cloud sends token 0), got {handoff}")
        self.theta = float(theta)
        self.delta_min = float(delta_min)
        self.handoff = int(handoff)
        self.handoff_fixed = False
        self.t_catch = t_catch
        self.shown: list[ShownToken] = []
        self.discarded: list[int] = []  # cloud indices dropped because the device took over first
        self._buf: dict[int, tuple[int, str, float]] = {}

    # ---- inputs -------------------------------------------------------------------------
    def cloud_token(self, index: int, token_id: int, now: float) -> bool:
        """A cloud token arrived. Returns False when it is dropped (the device already owns
        that position after the handoff)."""
        if self.handoff_fixed and index >= self.handoff:
            self.discarded.append(index)
            return False
        if index < len(self.shown) or index in self._buf:
            raise BadSettingsError(f"cloud token {index} delivered twice")
        self._buf[index] = (int(token_id), CLOUD, float(now))
        return True

    def device_token(self, index: int, token_id: int, now: float) -> None:
        """A token the device decoded. Only allowed at or after the fixed handoff index."""
        if not self.handoff_fixed or index < self.handoff:
            raise BadSettingsError(f"device token {index} before the handoff (index {self.handoff})")
        if index < len(self.shown) or index in self._buf:
            raise BadSettingsError(f"device token {index} delivered twice")
        self._buf[index] = (int(token_id), DEVICE, float(now))

    def update_catch(self, t_catch: float) -> None:
        self.t_catch = float(t_catch)

    def extend_quota(self, extra: int) -> None:
        """The cloud was asked for ``extra`` more tokens: the handoff moves later."""
        if self.handoff_fixed:
            raise BadSettingsError("the handoff is already fixed")
        self.handoff += int(extra)

    def fix_handoff(self, index: int) -> None:
        """The device absorbed ``index`` cloud tokens and produces token ``index`` itself
        (0: no cloud token at all, the device answers alone). Buffered cloud tokens at or past
        it are dropped; earlier ones must all arrive."""
        if self.handoff_fixed:
            raise BadSettingsError("the handoff is already fixed")
        if index < 0 or index < len(self.shown):
            raise BadSettingsError(f"handoff index {index} before what is already shown ({len(self.shown)})")
        self.handoff = int(index)
        self.handoff_fixed = True
        for i in sorted(k for k in self._buf if k >= index):
            self._buf.pop(i)
            self.discarded.append(i)

    # ---- outputs ------------------------------------------------------------------------
    def delta(self, index: int) -> float:
        """The interval the pacer wants between token ``index - 1`` and ``index``."""
        if index <= 0 or not self.shown:
            return 0.0
        if index <= self.handoff and self.t_catch is not None:
            left = self.handoff - index + 1
            raw = (self.t_catch - self.shown[-1].shown) / left
            return min(max(raw, self.delta_min), self.theta)
        return self.delta_min

    def next_due(self) -> float | None:
        """When the next token is to be shown, or None while it has not arrived."""
        k = len(self.shown)
        item = self._buf.get(k)
        if item is None:
            return None
        arrived = item[2]
        if k == 0:
            return arrived
        return max(arrived, self.shown[-1].shown + self.delta(k))

    def release(self, now: float) -> list[ShownToken]:
        """Shows every token due by ``now`` (recorded at ``now``, the real display time)."""
        out: list[ShownToken] = []
        while True:
            due = self.next_due()
            if due is None or due > now:
                return out
            k = len(self.shown)
            token_id, source, arrived = self._buf.pop(k)
            shown = ShownToken(k, token_id, source, arrived, float(now), float(due))
            self.shown.append(shown)
            out.append(shown)

    def shortfall(self, c_d: float = 0.0) -> int | None:
        """Extra cloud tokens needed so that no interval exceeds theta before the estimated
        catch-up, when absorbing one more token costs the device ``c_d`` seconds. 0 when the
        plan holds; None when no count suffices (``c_d >= theta``)."""
        if self.handoff_fixed or self.t_catch is None:
            return 0
        if not self.shown:
            return 0
        left = self.handoff - len(self.shown) + 1
        gap = self.t_catch - self.shown[-1].shown
        if gap <= self.theta * left:
            return 0
        if c_d >= self.theta:
            return None
        return max(0, math.ceil((gap - self.theta * left) / (self.theta - c_d) - 1e-9))

    # ---- statistics ---------------------------------------------------------------------
    def gaps(self) -> list[float]:
        s = self.shown
        return [s[i].shown - s[i - 1].shown for i in range(1, len(s))]

    def handoff_gap(self) -> float | None:
        """Displayed interval into the first device token (None before it was shown)."""
        if not self.handoff_fixed or len(self.shown) <= self.handoff:
            return None
        return self.shown[self.handoff].shown - self.shown[self.handoff - 1].shown
