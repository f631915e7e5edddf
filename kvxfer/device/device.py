"""The device runtime of P/D-Device: its own process, throttled to a device class.

Per request (a :class:`Job`), by method:

``pd-device`` [abstract + inferred details]
  1. Opens the session to the cloud helper; the hello carries the model version and tokenizer
     digest, a mismatch ends the request with :class:`VersionMismatchError`.
  2. Starts its own prefill of the raw prompt at once (chunks of ``chunk`` tokens), in parallel
     with the cloud's prefill. When the refined prompt arrives with the first token (rho < 1) it
     keeps the KV of the longest common prefix (at least the system part) and prefills the rest
     of the refined prompt; if the raw prompt was already done it keeps the raw one.
  3. Absorbs the cloud tokens received so far in one batched prefill (not one decode step per
     token), repeats while more arrived, and catches up once nothing is pending: it owns token
     ``h`` = tokens absorbed, tells the cloud ``caught_up``, and decodes locally from there.
  4. The :class:`Pacer` shows tokens (display thread); the device feeds it the estimated
     catch-up time after each chunk and asks the cloud for ``more`` tokens when the pacer says
     the quota cannot cover it; when its decode step is longer than theta it asks the cloud to
     ``finish`` the answer instead.
  5. If the link breaks, the device absorbs what it has and continues alone; the gap is reported.
``device-only``: the whole prompt on the device, tokens shown as decoded.
``cloud-only``: the whole answer from the cloud, shown on arrival.
``naive-hybrid``: cloud tokens shown on arrival (no pacer), raw prompt (no refinement).

Throttling: each piece of device work runs for real on the model, then the runtime sleeps until
the time the device class would have taken (``prefill_tok_s``, ``absorb_tok_s``, ``decode_ms``).
When the host is slower than the class, the overrun is reported (``overrun_s``).

Run as a process: ``python -m kvxfer.device.device --model tiny:0 --profile phone-npu-1b`` reads
one JSON job per stdin line and writes one JSON result per stdout line; :class:`DeviceProcess`
drives it.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from kvxfer.child_env import child_env
from kvxfer.device import wire
from kvxfer.device.errors import (
    BadSettingsError,
    DeviceError,
    DeviceTimeoutError,
    LinkDownError,
    VersionMismatchError,
)
from kvxfer.device.lm import LM, KvState, load_lm
from kvxfer.device.pacer import Pacer, cloud_must_finish
from kvxfer.device.profiles import DeviceProfile, profile
from kvxfer.device.sim import CLOUD_ONLY, DEVICE_ONLY, METHODS, NAIVE, PD, percentile
from kvxfer.device.timing import refined_len

DISPLAY_MARGIN = 0.005  # s: the pacer's margin under theta until lateness has been measured
MARGIN_FLOOR = 0.001  # s: the measured margin never goes below this
MARGIN_SAMPLES = 30  # lateness samples (display and sleep each) before the measured margin is used
LATENESS_WINDOW = 2000  # the most recent samples kept per kind (a few requests' worth). Their
# p99.9 is about the third largest, so one or two late wake-ups do not move it, and the margin
# the settings read before a request stays the one the pacer uses in it
LATENESS_Q = 99.9  # percentile of each kind of lateness that the margin covers (a gap of a paced
# request is late with a chance of 1 - Q/100 per token, and a request paces tens of tokens)
CALIBRATION_WAIT = 0.002  # s: the short waits that seed the lateness at runtime start
SWITCH_INTERVAL = 0.0005  # s: the device process's GIL switch interval (Python's default is 5 ms:
# the display thread could wait that long for the compute thread to let go)


class Lateness:
    """Online measure of how late this process wakes up, for the pacer's margin [inferred].

    The displayed gap into token k is the pacer's interval plus the display thread's lateness
    (release time minus due time); the device's first token is also late by the throttle's
    sleep overshoot (the device finishes its absorb a little after the class's time). The
    margin under theta is the sum of a high percentile of both, never below
    :data:`MARGIN_FLOOR`, never above half of theta; until both kinds have
    :data:`MARGIN_SAMPLES` samples it is the fixed :data:`DISPLAY_MARGIN`; :meth:`calibrate`
    measures that many at once. It lives as long as the device process, so each request starts
    from what the earlier ones measured, and the settings read the same figure before they plan
    (:meth:`DeviceProcess.margin`).
    """

    def __init__(self) -> None:
        self.display: deque[float] = deque(maxlen=LATENESS_WINDOW)
        self.sleep: deque[float] = deque(maxlen=LATENESS_WINDOW)
        self.lock = threading.Lock()

    def add(self, kind: str, late: float) -> None:
        with self.lock:
            (self.display if kind == "display" else self.sleep).append(max(0.0, late))

    def quantiles(self) -> tuple[float | None, float | None]:
        with self.lock:
            d, s = list(self.display), list(self.sleep)
        q = lambda xs: percentile(xs, LATENESS_Q) if len(xs) >= MARGIN_SAMPLES else None  # noqa: E731
        return q(d), q(s)

    def margin(self, theta: float) -> float:
        d, s = self.quantiles()
        if d is None or s is None:
            return min(DISPLAY_MARGIN, 0.1 * theta)
        return min(max(MARGIN_FLOOR, d + s), 0.5 * theta)

    def calibrate(self, samples: int = MARGIN_SAMPLES, wait: float = CALIBRATION_WAIT) -> None:
        """Seed both kinds with ``samples`` short waits each, as the pacer's threads wait: a timed
        wait on a condition (the display) and a sleep (the throttle). Before this the margin is
        the fixed default, which the settings would plan with although the pacer would not."""
        cv = threading.Condition()
        for _ in range(samples):
            with cv:
                due = time.monotonic() + wait
                cv.wait(wait)
                self.add("display", time.monotonic() - due)
            due = time.monotonic() + wait
            time.sleep(wait)
            self.add("sleep", time.monotonic() - due)


@dataclass
class Job:
    request_id: str
    method: str
    prompt_token_ids: list[int]
    max_tokens: int
    n: int = 1
    rho: float = 1.0
    system_len: int = 0
    query_len: int = 0
    theta: float = 0.05
    delta_min: float = 0.01
    stop_token_ids: list[int] = field(default_factory=list)
    cloud: str | None = None  # "host:port" of the cloud helper (through the link proxy)
    # the pacer margin the settings planned n with (None: not planned); the pacer runs at theta
    # minus the larger of this and what the device measures at the request's start
    margin_s: float | None = None
    deadline_s: float = 120.0

    def check(self) -> None:
        if self.method not in METHODS:
            raise BadSettingsError(f"unknown method {self.method!r}; known: {METHODS}")
        if not self.prompt_token_ids or self.max_tokens < 1:
            raise BadSettingsError("a job needs a prompt and max_tokens >= 1")
        if self.method != DEVICE_ONLY and not self.cloud:
            raise BadSettingsError(f"method {self.method} needs the cloud address")
        if not 0 < self.rho <= 1 or self.n < 1:
            raise BadSettingsError(f"bad settings n={self.n}, rho={self.rho}")
        if self.margin_s is not None and not 0 <= self.margin_s <= 0.5 * self.theta:
            raise BadSettingsError(f"margin_s={self.margin_s} is outside [0, theta/2 = {0.5 * self.theta}]")


class _Throttle:
    def __init__(self, clock, lateness: Lateness | None = None) -> None:
        self.clock = clock
        self.vt = 0.0
        self.overrun = 0.0
        self.lateness = lateness

    def run(self, cost: float, fn, *args):
        start = max(self.vt, self.clock())
        out = fn(*args)
        self.vt = start + cost
        late = self.clock() - self.vt
        if late > 0:
            self.overrun += late
            self.vt = self.clock()
        else:
            time.sleep(-late)
            if self.lateness is not None:
                self.lateness.add("sleep", self.clock() - self.vt)
        return out


class _Session:
    """One request on the device (see the module docstring)."""

    def __init__(
        self, lm: LM, prof: DeviceProfile, job: Job, chunk: int, lateness: Lateness | None = None
    ) -> None:
        self.lm, self.prof, self.job, self.chunk = lm, prof, job, chunk
        self.lateness = lateness or Lateness()
        self.t0 = time.monotonic()
        self.deadline = self.t0 + job.deadline_s
        self.cv = threading.Condition()
        self.stops = set(job.stop_token_ids)
        self.cloud_tokens: list[int] = []
        self.refined: list[int] | None = None
        self.stream_end: str | None = None  # "done" | "link_down"
        self.done_msg: dict | None = None
        self.error: Exception | None = None
        self.link_down_at: float | None = None
        self.final_len: int | None = None
        self.sock: socket.socket | None = None
        self.send_lock = threading.Lock()
        self.pending: list[dict] = []
        self.log: list[tuple[float, str, object]] = []
        self.throttle = _Throttle(self.now, self.lateness)
        # device progress, shared with the receiver for the catch-up estimate (under self.cv):
        # ``pos`` counts the chunk in flight, ``free_at`` is when that chunk will be done
        self.pos = 0
        self.free_at = 0.0
        self.target_len = len(job.prompt_token_ids)
        self.applied = job.method != PD or job.rho >= 1.0
        self.quota = job.n
        self.absorbed = 0
        self.more_requests = 0
        self.est_max: float | None = None  # the latest catch-up the device ever estimated
        pace = job.method == PD
        # the pacer aims a little under theta: the display thread wakes late, and the device's
        # first token comes a little after the class's time; the margin is measured [inferred].
        # It is never below what the settings planned with, so their n covers the pacing, and
        # never below what is measured now, so a lateness that grew since is still covered (the
        # pacer then asks for more tokens)
        self.measured_margin = self.lateness.margin(job.theta)
        self.margin = max(self.measured_margin, job.margin_s or 0.0)
        self.pacer = Pacer(
            theta=job.theta - self.margin,
            delta_min=job.delta_min if pace else 0.0,
            handoff=max(1, job.n if job.method != CLOUD_ONLY else job.max_tokens),
        )

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeviceTimeoutError(
                f"request {self.job.request_id} passed its deadline of {self.job.deadline_s} s"
            )
        return left

    # ---- network ---------------------------------------------------------------------------
    def _send(self, msg: dict) -> None:
        with self.send_lock:
            if self.sock is None:  # not yet past "generate": goes out right after it
                if self.stream_end is None:
                    self.pending.append(msg)
                return
            try:
                self.sock.sendall(wire.encode(msg))
            except OSError:
                pass  # the receiver reports the broken link

    def _receiver(self) -> None:
        j = self.job
        host, port = j.cloud.rsplit(":", 1)
        sock = f = None
        try:
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.settimeout(max(1.0, self.deadline - time.monotonic()))
            f = sock.makefile("rb")
            sock.sendall(wire.encode({"type": "hello", **self.lm.identity()}))
            line = f.readline()
            if not line.endswith(b"\n"):
                raise LinkDownError("the link broke during the hello")
            hello = wire.decode(line)
            if hello["type"] != "hello_ok":
                if hello.get("code") == "version_mismatch":
                    raise VersionMismatchError(f"cloud refused the session: {hello.get('message')}")
                raise LinkDownError(f"cloud ended the session at hello: {hello}")
            n = j.max_tokens if j.method == CLOUD_ONLY else j.n
            generate = wire.encode(
                {
                    "type": "generate",
                    "request_id": j.request_id,
                    "prompt_token_ids": j.prompt_token_ids,
                    "n": n,
                    "rho": j.rho if j.method == PD else 1.0,
                    "system_len": j.system_len,
                    "query_len": j.query_len,
                    "max_tokens": j.max_tokens,
                    "stop_token_ids": j.stop_token_ids,
                }
            )
            with self.send_lock:
                sock.sendall(generate + b"".join(wire.encode(m) for m in self.pending))
                self.pending.clear()
                self.sock = sock
            while True:
                line = f.readline()
                if not line.endswith(b"\n"):  # EOF, or a line cut by the link
                    raise LinkDownError("the cloud stream ended without done")
                m = wire.decode(line)
                t = self.now()
                with self.cv:
                    if m["type"] == "token":
                        if m["index"] != len(self.cloud_tokens):
                            raise DeviceError(f"cloud token {m['index']} out of order")
                        self.cloud_tokens.append(int(m["token_id"]))
                        if "refined" in m:
                            self.refined = [int(i) for i in m["refined"]]
                        elif m["index"] == 0:
                            self.applied = True  # no refinement from this cloud: keep the raw prompt
                        self.pacer.cloud_token(m["index"], int(m["token_id"]), t)
                        extra = self._replan()
                        if extra:
                            self._send({"type": "more", "n": extra})
                    elif m["type"] == "done":
                        self.done_msg, self.stream_end = m, "done"
                        self.cv.notify_all()
                        return
                    elif m["type"] == "error":
                        raise DeviceError(f"cloud error {m.get('code')}: {m.get('message')}")
                    self.cv.notify_all()
        except (OSError, LinkDownError) as e:
            with self.cv:
                if self.stream_end is None:
                    self.stream_end, self.link_down_at = "link_down", self.now()
                    self.log.append((self.now(), "link_down", repr(e)))
                self.cv.notify_all()
        except Exception as e:  # noqa: BLE001 - handed to the compute thread
            with self.cv:
                self.error = e
                self.stream_end = self.stream_end or "error"
                self.cv.notify_all()
        finally:
            if f is not None:
                f.close()
            with self.send_lock:
                if sock is not None and self.sock is not sock:
                    sock.close()

    # ---- display ---------------------------------------------------------------------------
    def _display(self) -> None:
        with self.cv:
            while True:
                if self.final_len is not None and len(self.pacer.shown) >= self.final_len:
                    return
                if time.monotonic() > self.deadline or self.error is not None:
                    return
                due = self.pacer.next_due()
                t = self.now()
                if due is not None and due <= t:
                    self.lateness.add("display", t - due)
                    self.pacer.release(t)
                    self.cv.notify_all()
                    continue
                self.cv.wait(min(0.05, (due - t) if due is not None else 0.05))

    # ---- compute ---------------------------------------------------------------------------
    def _wait(self, pred) -> None:
        with self.cv:
            while not pred():
                if self.error is not None:
                    raise self.error
                self.cv.wait(min(0.05, self._left()))
            if self.error is not None:
                raise self.error

    def _estimate_catch(self) -> float:
        """When the device will own token ``quota`` (call under ``self.cv``)."""
        j, p = self.job, self.prof
        L = len(j.prompt_token_ids)
        if self.applied or self.pos >= L:
            remaining = self.target_len - self.pos
        else:  # the refined prompt replaces the raw one; the system part's KV is kept
            new_len = len(self.refined) if self.refined else refined_len(L, j.rho, j.system_len, j.query_len)
            remaining = new_len - min(self.pos, j.system_len)
        free = max(self.free_at, self.now())
        return free + remaining / p.prefill_tok_s + max(0, self.quota - self.absorbed) * p.c_d

    def _replan(self) -> int:
        """Re-estimates the catch-up for the pacer; returns how many more cloud tokens to ask
        for (0: none). Call under ``self.cv``; send the ``more`` message after releasing it."""
        if self.job.method != PD or self.pacer.handoff_fixed or self.stream_end is not None:
            return 0
        est = self._estimate_catch()
        self.est_max = est if self.est_max is None else max(self.est_max, est)
        self.pacer.update_catch(est)
        extra = self.pacer.shortfall(self.prof.c_d)
        if not extra:
            return 0
        extra = min(extra, self.job.max_tokens - self.quota)
        if extra <= 0:
            return 0
        self.pacer.extend_quota(extra)
        self.quota += extra
        self.more_requests += 1
        self.log.append((self.now(), "more", extra))
        self.pacer.update_catch(self._estimate_catch())
        return extra

    def run(self) -> dict:
        j = self.job
        j.check()
        threads = []
        if j.method != DEVICE_ONLY:
            threads.append(threading.Thread(target=self._receiver, name="device-rx", daemon=True))
        threads.append(threading.Thread(target=self._display, name="device-display", daemon=True))
        for t in threads:
            t.start()
        info: dict = {"fallback": None}
        try:
            if j.method == CLOUD_ONLY:
                self._wait(lambda: self.stream_end is not None)
                with self.cv:
                    self.final_len = len(self.cloud_tokens)
                    self.cv.notify_all()
            else:
                self._device_side(info)
            self._wait(lambda: len(self.pacer.shown) >= (self.final_len or 0))
            if j.method != DEVICE_ONLY:
                self._wait(lambda: self.stream_end is not None)
        finally:
            with self.send_lock:
                if self.sock is not None:
                    try:
                        self.sock.close()
                    except OSError:
                        pass
                    self.sock = None
            with self.cv:
                self.final_len = self.final_len if self.final_len is not None else 0
                self.cv.notify_all()
            for t in threads:
                t.join(5)
        return self._result(info)

    def _device_side(self, info: dict) -> None:
        j, lm, p = self.job, self.lm, self.prof
        prompt = list(j.prompt_token_ids)
        if j.method in (PD, NAIVE) and cloud_must_finish(p.tau_d, j.theta):
            # the device can never keep the pace after a handoff: the cloud finishes the answer
            info["fallback"] = "cloud_finish"
            self._wait(lambda: self.sock is not None or self.stream_end is not None)
            self._send({"type": "finish"})
            self._wait(lambda: self.stream_end is not None)
            with self.cv:
                self.final_len = len(self.cloud_tokens)
                self.cv.notify_all()
            return
        st = KvState()
        target, pos = prompt, 0
        while pos < len(target):
            self._left()
            with self.cv:
                ref = None if self.applied else self.refined
            if ref is not None:
                new = [prompt[i] for i in ref]
                lcp = 0
                while lcp < min(pos, len(new)) and st.ids[lcp] == new[lcp]:
                    lcp += 1
                lcp = min(lcp, len(new) - 1)
                if lcp < pos:
                    lm.truncate(st, lcp)
                target, pos = new, lcp
                with self.cv:
                    self.applied, self.pos, self.target_len = True, pos, len(target)
                self.log.append((self.now(), "refined", (len(new), lcp)))
            # small chunks while the refined prompt may still replace the raw one, and the
            # system part (which the refiner always keeps) first: past it, raw tokens are likely
            # thrown away when the refined prompt arrives, so the chunks shrink to 16 tokens
            if self.applied:
                size = self.chunk
            elif pos < j.system_len:
                size = min(max(16, self.chunk // 4), j.system_len - pos)
            else:
                size = 16
            c = target[pos : pos + size]
            cost = len(c) / p.prefill_tok_s
            with self.cv:  # the catch-up estimate counts this chunk as done at free_at
                self.pos, self.free_at = pos + len(c), max(self.throttle.vt, self.now()) + cost
            self.throttle.run(cost, lm.extend, st, c)
            pos += len(c)
            with self.cv:
                self.pos, self.free_at = pos, self.throttle.vt
                if pos >= len(prompt) and not self.applied:
                    self.applied = True  # the raw prompt is done first: keep it
                extra = self._replan()
                self.cv.notify_all()
            if extra:
                self._send({"type": "more", "n": extra})
        t_ready = self.now()
        info["t_ready"] = t_ready
        info["device_prompt_tokens"] = len(target)
        info["used_refined"] = target is not prompt
        info["refined"] = self.refined if target is not prompt else None
        absorbed = 0
        ends = False  # the cloud's part already ends the answer (stop token or max_tokens)
        while True:
            if j.method != DEVICE_ONLY:
                self._wait(
                    lambda a=absorbed: len(self.cloud_tokens) > a or a >= 1 or self.stream_end is not None
                )
            with self.cv:
                avail = list(self.cloud_tokens)
                if len(avail) == absorbed:
                    # nothing pending: catch up now, atomically with the display, so no cloud
                    # token past the handoff can have been shown
                    if not ends:
                        self.pacer.fix_handoff(absorbed)
                        self.pacer.device_token(absorbed, st.next_token, self.now())
                        self.cv.notify_all()
                    break
            new = avail[absorbed:]
            with self.cv:
                self.free_at = max(self.throttle.vt, self.now()) + len(new) * p.c_d
            self.throttle.run(len(new) * p.c_d, lm.extend, st, new)
            self.log.append((self.now(), "absorb", len(new)))
            absorbed = len(avail)
            with self.cv:
                self.absorbed = absorbed
            stop_at = next((i for i, t in enumerate(avail) if t in self.stops), None)
            if stop_at is not None or absorbed >= j.max_tokens:
                ends = True
                end = absorbed if stop_at is None else stop_at + 1
                with self.cv:
                    self.final_len = min(end, j.max_tokens)
                    self.cv.notify_all()
                break
        info["t_catch"] = self.now()
        info["absorbed"] = absorbed
        h = absorbed
        if j.method != DEVICE_ONLY:
            self._send({"type": "caught_up", "index": h})
        if ends:
            return
        last, i = st.next_token, h
        while last not in self.stops and i + 1 < j.max_tokens:
            self._left()
            last = self.throttle.run(p.tau_d, lm.decode, st, j.max_tokens + 1)
            i += 1
            with self.cv:
                self.pacer.device_token(i, last, self.now())
                self.cv.notify_all()
        with self.cv:
            self.final_len = i + 1
            self.cv.notify_all()

    def _result(self, info: dict) -> dict:
        j = self.job
        shown = self.pacer.shown[: self.final_len]
        gaps = [shown[i].shown - shown[i - 1].shown for i in range(1, len(shown))]
        link_gap = None
        if self.link_down_at is not None:
            after = [g for s, g in zip(shown[1:], gaps, strict=True) if s.shown >= self.link_down_at]
            link_gap = max(after, default=0.0)
        done = self.done_msg or {}
        return {
            "request_id": j.request_id,
            "method": j.method,
            "prompt_tokens": len(j.prompt_token_ids),
            "n": j.n,
            "rho": j.rho,
            "tokens": [s.token_id for s in shown],
            "sources": "".join("c" if s.source == "cloud" else "d" for s in shown),
            "shown_s": [s.shown for s in shown],
            "arrived_s": [s.arrived for s in shown],
            "due_s": [s.due for s in shown],
            "ttft_s": shown[0].shown if shown else None,
            "tpot_max_s": max(gaps, default=0.0),
            "tpot_p99_s": percentile(gaps, 99),
            "handoff": self.pacer.handoff if self.pacer.handoff_fixed else None,
            "cloud_busy_s": done.get("cloud_busy_s"),
            "cloud_tokens": done.get("cloud_tokens", len(self.cloud_tokens)),
            "cloud_received": len(self.cloud_tokens),
            "stream_end": self.stream_end,
            "link_down_s": self.link_down_at,
            "link_gap_s": link_gap,
            "overrun_s": self.throttle.overrun,
            "more_requests": self.more_requests,
            "catch_estimate_max_s": self.est_max,
            "pacer_margin_s": self.margin,
            "planned_margin_s": j.margin_s,
            "measured_margin_s": self.measured_margin,
            "next_margin_s": self.lateness.margin(j.theta),
            "display_late_q_s": self.lateness.quantiles()[0],
            "sleep_late_q_s": self.lateness.quantiles()[1],
            "log": self.log,
            **info,
        }


class DeviceRuntime:
    """In-process runtime (the process entry point wraps one)."""

    def __init__(self, lm: LM, prof: DeviceProfile, chunk: int = 256) -> None:
        self.lm, self.prof, self.chunk = lm, prof, chunk
        self.lateness = Lateness()  # measured across the requests of this runtime
        self.lateness.calibrate()

    def run(self, job: Job) -> dict:
        return _Session(self.lm, self.prof, job, self.chunk, self.lateness).run()


_ERRORS = {
    "VersionMismatchError": VersionMismatchError,
    "BadSettingsError": BadSettingsError,
    "LinkDownError": LinkDownError,
    "DeviceTimeoutError": DeviceTimeoutError,
}


class DeviceProcess:
    """The device runtime in its own process (stdin/stdout JSON lines)."""

    def __init__(
        self, model: str = "tiny:0", prof: DeviceProfile | str = "phone-npu-1b", chunk: int = 256
    ) -> None:
        prof = profile(prof) if isinstance(prof, str) else prof
        env = child_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "kvxfer.device.device", "--model", model, "--chunk", str(chunk)]
        cmd += ["--profile-json", json.dumps(prof.to_json())]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        try:
            ready = self._read(120.0)
            if ready.get("type") != "ready":
                raise DeviceError(f"device process did not start: {ready}")
        except BaseException:
            self.close()  # no process or pipes left behind when the start fails
            raise
        self.identity = ready["identity"]

    def _read(self, timeout: float) -> dict:
        box: list[str] = []
        t = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        if not box:
            self.close()
            raise DeviceTimeoutError(f"device process gave no answer in {timeout} s")
        if not box[0]:
            raise DeviceError(f"device process exited (code {self.proc.wait(5)})")
        try:
            return json.loads(box[0])
        except json.JSONDecodeError as e:
            raise DeviceError(f"device process wrote something that is not JSON: {box[0][:200]!r}") from e

    def margin(self, theta: float, timeout: float = 10.0) -> float:
        """The pacer margin the runtime would use for a request starting now (seconds): what the
        settings plan n with, then pass on as :attr:`Job.margin_s`."""
        self.proc.stdin.write(json.dumps({"query": "margin", "theta": theta}) + "\n")
        self.proc.stdin.flush()
        out = self._read(timeout)
        if "margin_s" not in out:
            raise DeviceError(f"device process answered the margin query with {out}")
        return float(out["margin_s"])

    def run(self, job: Job) -> dict:
        self.proc.stdin.write(json.dumps(asdict(job)) + "\n")
        self.proc.stdin.flush()
        out = self._read(job.deadline_s + 30)
        if "error" in out:
            raise _ERRORS.get(out["error"], DeviceError)(out["message"])
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def __enter__(self) -> DeviceProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvxfer.device.device")
    ap.add_argument("--model", default="tiny:0")
    ap.add_argument("--profile", default="phone-npu-1b")
    ap.add_argument("--profile-json", default=None)
    ap.add_argument("--chunk", type=int, default=256)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    sys.setswitchinterval(SWITCH_INTERVAL)
    prof = DeviceProfile.from_json(json.loads(a.profile_json)) if a.profile_json else profile(a.profile)
    lm = load_lm(a.model)
    rt = DeviceRuntime(lm, prof, a.chunk)
    print(json.dumps({"type": "ready", "identity": lm.identity(), "profile": prof.to_json()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
            if msg.get("query") == "margin":
                theta = float(msg["theta"])
                out = {"margin_s": rt.lateness.margin(theta), "quantiles_s": rt.lateness.quantiles()}
                print(json.dumps(out), flush=True)
                continue
            job = Job(**msg)
            out = rt.run(job)
        except DeviceError as e:
            out = {"error": type(e).__name__, "message": str(e)}
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            out = {"error": "BadSettingsError", "message": f"bad job: {e!r}"}
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
