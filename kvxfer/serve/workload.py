"""Scenario-labelled request workloads: synthetic scenarios and the Azure LLM trace 2023.

A request's prompt is a scenario's **setting part** (the same text for every request of the
scenario, so a prefill can reuse its KV) followed by a **query part** [paper, P/D-Serve 2.1].
Each scenario has its own distributions of query and output length. Everything is generated
from seeds, so a workload replays identically: request ``k`` of closed-loop user ``u`` is a
pure function of ``(seed, u, k)``; open-loop arrival times of ``(seed, rate)``.

Token lengths are exact for the byte tokenizer (ASCII text, one token per character, unit
``"char"``). For a BPE tokenizer (SmolLM2) use unit ``"word"``: each token is one common English
word with a leading space, which such tokenizers encode as one token, so lengths are close but
not exact (the gateway counts the real ones).

The Azure LLM inference trace 2023 (``data/azure-llm-2023``; Patel et al., "Splitwise", ISCA 2024;
CC-BY 4.0) gives arrival times and (context, generated) token counts of two services, code and
conversation, which become two scenarios. Its lengths go up to 14k context tokens; a small model
holds fewer, so :class:`LengthScale` maps them explicitly (multiply, then clamp) and every
replayed request keeps the trace's original numbers next to the scaled ones.
"""

from __future__ import annotations

import csv
import math
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from kvxfer.errors import InvalidArgumentError

TRACE_DIR = Path(__file__).resolve().parent / "data" / "azure-llm-2023"
TRACE_FILES = {"code": "AzureLLMInferenceTrace_code.csv", "conversation": "AzureLLMInferenceTrace_conv.csv"}

# Words that GPT-2-style BPE vocabularies (SmolLM2's included) hold as one token with a leading space.
_WORDS = (
    "the of and to in is that for it with as was on be at by this had not are but from or have an they "
    "which one you were all we her she there would their will when who him been has more if no out do so "
    "can what up said about other into than its time only could new them man some these then two first may "
    "any like now my such make over our even most me state after also made many did must before back see "
    "through way where get much go well your know should down work year because come people just say each"
).split()


class WorkloadError(InvalidArgumentError):
    """A workload specification that cannot be generated (bad lengths, weights, unknown scenario)."""


# --------------------------------------------------------------------------------------------
# Length distributions


@dataclass(frozen=True)
class Fixed:
    n: int

    def sample(self, rng: np.random.Generator) -> int:
        return self.n

    def mean(self) -> float:
        return float(self.n)


@dataclass(frozen=True)
class Choice:
    """One of ``values`` with probabilities proportional to ``weights``."""

    values: tuple[int, ...]
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not self.values or (self.weights is not None and len(self.weights) != len(self.values)):
            raise WorkloadError(
                f"Choice needs values and as many weights, got {self.values} / {self.weights}"
            )

    def _p(self) -> np.ndarray:
        w = np.ones(len(self.values)) if self.weights is None else np.asarray(self.weights, float)
        if (w < 0).any() or w.sum() <= 0:
            raise WorkloadError(f"Choice weights must be >= 0 with a positive sum, got {self.weights}")
        return w / w.sum()

    def sample(self, rng: np.random.Generator) -> int:
        return int(self.values[int(rng.choice(len(self.values), p=self._p()))])

    def mean(self) -> float:
        return float(np.dot(self._p(), self.values))


@dataclass(frozen=True)
class Uniform:
    lo: int
    hi: int  # inclusive

    def sample(self, rng: np.random.Generator) -> int:
        return int(rng.integers(self.lo, self.hi + 1))

    def mean(self) -> float:
        return (self.lo + self.hi) / 2


@dataclass(frozen=True)
class LogNormal:
    """``median * exp(sigma * N(0,1))``, rounded and clamped to ``[lo, hi]``."""

    median: float
    sigma: float
    lo: int = 1
    hi: int = 1 << 20

    def sample(self, rng: np.random.Generator) -> int:
        return int(
            min(self.hi, max(self.lo, round(self.median * math.exp(self.sigma * rng.standard_normal()))))
        )

    def mean(self) -> float:  # of the unclamped distribution
        return self.median * math.exp(self.sigma**2 / 2)


LengthDist = Fixed | Choice | Uniform | LogNormal


# --------------------------------------------------------------------------------------------
# Scenarios and requests


@dataclass(frozen=True)
class Scenario:
    """``setting_tokens`` of shared setting text, then a query of ``query`` tokens; the answer
    is limited to ``output`` tokens. ``weight`` is its share of the traffic."""

    name: str
    setting_tokens: int
    query: LengthDist
    output: LengthDist
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.name or self.setting_tokens < 0 or self.weight < 0:
            raise WorkloadError(f"bad scenario {self.name!r}: setting_tokens and weight must be >= 0")


@dataclass
class Request:
    """One request. ``prompt_tokens`` counts the prompt in the workload's token unit."""

    request_id: str
    scenario: str
    prompt: str
    prompt_tokens: int
    setting_tokens: int
    max_tokens: int
    arrival_s: float | None = None  # open loop / trace: seconds from the start
    meta: dict[str, Any] = field(default_factory=dict)


class TextMaker:
    """Deterministic filler text of an exact token count in the unit ``"char"`` or ``"word"``."""

    def __init__(self, unit: str = "char") -> None:
        if unit not in ("char", "word"):
            raise WorkloadError(f"token unit must be 'char' or 'word', got {unit!r}")
        self.unit = unit

    def text(self, n: int, rng: np.random.Generator) -> str:
        if n <= 0:
            return ""
        if self.unit == "word":
            idx = rng.integers(0, len(_WORDS), size=n)
            return "".join(" " + _WORDS[i] for i in idx)
        idx = rng.integers(0, len(_WORDS), size=n // 2 + 1)  # words are >= 1 char + a space
        out = " ".join(_WORDS[i] for i in idx)
        return out[:n]


def _seed(*parts: object) -> list[int]:
    return [zlib.crc32(str(p).encode()) for p in parts]


class Workload:
    """A set of scenarios; draws scenario-labelled :class:`Request` objects deterministically."""

    def __init__(self, scenarios: Sequence[Scenario], seed: int = 0, unit: str = "char") -> None:
        if not scenarios:
            raise WorkloadError("a workload needs at least one scenario")
        names = [s.name for s in scenarios]
        if len(set(names)) != len(names):
            raise WorkloadError(f"scenario names must be unique, got {names}")
        w = np.array([s.weight for s in scenarios], float)
        if w.sum() <= 0:
            raise WorkloadError("scenario weights must have a positive sum")
        self.scenarios = list(scenarios)
        self.by_name = {s.name: s for s in scenarios}
        self.p = w / w.sum()
        self.seed = seed
        self.text = TextMaker(unit)
        self._settings: dict[str, str] = {}

    def setting(self, scenario: str) -> str:
        """The scenario's setting text: the same for every request, every run."""
        if scenario not in self._settings:
            s = self.by_name[scenario]
            rng = np.random.default_rng(_seed("setting", scenario))
            head = f"[{scenario}] "[: s.setting_tokens] if self.text.unit == "char" else ""
            self._settings[scenario] = head + self.text.text(s.setting_tokens - len(head), rng)
        return self._settings[scenario]

    def make(
        self, scenario: str, query_tokens: int, max_tokens: int, rng: np.random.Generator, rid: str
    ) -> Request:
        if scenario not in self.by_name:
            raise WorkloadError(f"unknown scenario {scenario!r}; known: {sorted(self.by_name)}")
        if query_tokens < 1 or max_tokens < 1:
            raise WorkloadError(f"query and output lengths must be >= 1, got {query_tokens}, {max_tokens}")
        setting = self.setting(scenario)
        query = self.text.text(query_tokens, rng)
        n_setting = self.by_name[scenario].setting_tokens
        return Request(rid, scenario, setting + query, n_setting + query_tokens, n_setting, max_tokens)

    def request(self, *key: object) -> Request:
        """The request for ``key`` (e.g. ``(user, k)`` or ``(index,)``): same key, same request."""
        rng = np.random.default_rng(_seed(self.seed, *key))
        s = self.scenarios[int(rng.choice(len(self.scenarios), p=self.p))]
        return self.make(s.name, s.query.sample(rng), s.output.sample(rng), rng, "-".join(map(str, key)))

    def user_stream(self, user: int) -> Iterator[Request]:
        """A closed-loop user's requests, in order."""
        k = 0
        while True:
            yield self.request("u", user, k)
            k += 1

    def requests(self, n: int) -> list[Request]:
        return [self.request("i", i) for i in range(n)]

    def open_loop(self, rate_rps: float, n: int) -> list[Request]:
        """``n`` requests with Poisson arrivals at ``rate_rps``."""
        times = poisson_arrivals(rate_rps, n, self.seed)
        reqs = self.requests(n)
        for r, t in zip(reqs, times, strict=True):
            r.arrival_s = float(t)
        return reqs


class Replay:
    """Closed-loop users over a fixed request list (e.g. a trace): each user's next request is
    the list's next one (shared cursor, wrapping around), so the content order is the list's."""

    def __init__(self, requests: Sequence[Request]) -> None:
        if not requests:
            raise WorkloadError("Replay needs at least one request")
        self.requests = list(requests)
        self._next = 0

    def user_stream(self, user: int) -> Iterator[Request]:
        while True:
            r = self.requests[self._next % len(self.requests)]
            self._next += 1
            yield r


def poisson_arrivals(rate_rps: float, n: int, seed: int = 0) -> np.ndarray:
    """Arrival times (s from 0) of a Poisson process: exponential gaps of mean ``1/rate_rps``."""
    if rate_rps <= 0 or n < 0:
        raise WorkloadError(f"rate must be > 0 and n >= 0, got {rate_rps}, {n}")
    rng = np.random.default_rng(_seed("arrivals", seed, rate_rps))
    return np.cumsum(rng.exponential(1.0 / rate_rps, size=n))


def tidal_arrivals(segments: Sequence[tuple[float, float]], seed: int = 0) -> np.ndarray:
    """Poisson arrivals whose rate changes by segment: ``[(duration_s, rate_rps), ...]``."""
    out, t0 = [], 0.0
    for i, (dur, rate) in enumerate(segments):
        if dur <= 0 or rate < 0:
            raise WorkloadError(f"segment {i}: duration must be > 0 and rate >= 0, got {dur}, {rate}")
        if rate > 0:
            rng = np.random.default_rng(_seed("tidal", seed, i))
            t = t0 + np.cumsum(rng.exponential(1.0 / rate, size=int(dur * rate * 2 + 20)))
            out.append(t[t < t0 + dur])
        t0 += dur
    return np.concatenate(out) if out else np.zeros(0)


def paper_mix(
    scale: float = 1.0, output_tokens: int = 16, short_per_long: int = 3, name: str = "mixed"
) -> Scenario:
    """One scenario mixing long and short prompts, after P/D-Serve's example of one 8k prompt among
    2k ones [paper, 2.2]: prompt lengths 8192 and 2048 tokens times ``scale`` (the long one with
    probability ``1 / (1 + short_per_long)``), a shared setting part of 100 tokens times ``scale``
    (the paper's short prompts share 1k, the long one 0.1k; one setting per scenario here [inferred])."""
    setting = max(1, round(100 * scale))
    long_q, short_q = round(8192 * scale) - setting, round(2048 * scale) - setting
    if short_q < 1:
        raise WorkloadError(f"scale {scale} leaves no room for a query after the setting part")
    return Scenario(
        name, setting, Choice((long_q, short_q), (1.0, float(short_per_long))), Fixed(output_tokens)
    )


# --------------------------------------------------------------------------------------------
# The Azure LLM inference trace 2023


@dataclass(frozen=True)
class TraceRow:
    t_s: float  # seconds since the trace's first request (both files share one clock)
    context_tokens: int
    generated_tokens: int


def _parse_ts(text: str) -> float:
    # "2023-11-16 18:17:03.9799600": 7 fractional digits, more than datetime parses everywhere.
    whole, _, frac = text.strip().partition(".")
    base = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").timestamp()
    return base + (float("0." + frac) if frac else 0.0)


def load_trace(scenario: str, path: Path | None = None) -> list[TraceRow]:
    """The rows of one service's trace file, ``scenario`` "code" or "conversation"."""
    if scenario not in TRACE_FILES:
        raise WorkloadError(f"the Azure trace has scenarios {sorted(TRACE_FILES)}, not {scenario!r}")
    path = path or TRACE_DIR / TRACE_FILES[scenario]
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.append((_parse_ts(r["TIMESTAMP"]), int(r["ContextTokens"]), int(r["GeneratedTokens"])))
    return [TraceRow(t, c, g) for t, c, g in rows]


@dataclass(frozen=True)
class LengthScale:
    """How trace lengths become what the model can hold: ``clamp(round(n * factor), lo, hi)``
    for prompts and for outputs separately. ``time_factor`` stretches (>1) or compresses (<1)
    the arrival times."""

    prompt_factor: float = 1.0
    max_prompt_tokens: int = 1 << 20
    min_prompt_tokens: int = 2
    output_factor: float = 1.0
    max_output_tokens: int = 1 << 20
    time_factor: float = 1.0

    def prompt(self, n: int) -> int:
        return int(min(self.max_prompt_tokens, max(self.min_prompt_tokens, round(n * self.prompt_factor))))

    def output(self, n: int) -> int:
        return int(min(self.max_output_tokens, max(1, round(n * self.output_factor))))


def azure_trace_workload(
    scale: LengthScale,
    setting_tokens: dict[str, int] | None = None,
    start_s: float = 0.0,
    duration_s: float | None = None,
    limit: int | None = None,
    unit: str = "char",
) -> tuple[Workload, list[Request]]:
    """Replay the trace: both services merged by time, from ``start_s`` for ``duration_s``
    seconds (trace time, before ``time_factor``), at most ``limit`` requests. Returns the
    :class:`Workload` (scenarios "code" and "conversation") and the requests, arrival times
    starting at 0. ``setting_tokens`` per scenario (default 64 each) is capped at half of each
    scaled prompt (the trace carries no prefix information: the shared part is our choice
    [inferred])."""
    settings = {"code": 64, "conversation": 64, **(setting_tokens or {})}
    rows = [(r.t_s, name, r) for name in TRACE_FILES for r in load_trace(name)]
    rows.sort(key=lambda x: (x[0], x[1]))
    t0 = rows[0][0] + start_s
    end = None if duration_s is None else t0 + duration_s
    picked = [(t, n, r) for t, n, r in rows if t >= t0 and (end is None or t < end)]
    if limit is not None:
        picked = picked[:limit]
    scenarios = [Scenario(n, settings[n], Fixed(1), Fixed(1)) for n in TRACE_FILES]
    wl = Workload(scenarios, seed=0, unit=unit)
    reqs = []
    for i, (t, name, row) in enumerate(picked):
        prompt_len = scale.prompt(row.context_tokens)
        setting = min(settings[name], prompt_len // 2)
        rng = np.random.default_rng(_seed("trace", name, i))
        text = wl.setting(name)[: setting if unit == "char" else None]
        if unit == "word":  # the setting text is whole words: keep the first `setting` of them
            text = "".join(" " + w for w in text.split()[:setting])
        query = wl.text.text(prompt_len - setting, rng)
        reqs.append(
            Request(
                request_id=f"{name}-{i}",
                scenario=name,
                prompt=text + query,
                prompt_tokens=prompt_len,
                setting_tokens=setting,
                max_tokens=scale.output(row.generated_tokens),
                arrival_s=(t - t0) * scale.time_factor,
                meta={
                    "trace_context_tokens": row.context_tokens,
                    "trace_generated_tokens": row.generated_tokens,
                },
            )
        )
    return wl, reqs


def scenario_stats(reqs: Sequence[Request]) -> dict[str, dict[str, float]]:
    """Per scenario: count, share, mean and p50/p99 of prompt and output length."""
    out: dict[str, dict[str, float]] = {}
    for name in sorted({r.scenario for r in reqs}):
        rs = [r for r in reqs if r.scenario == name]
        p = np.array([r.prompt_tokens for r in rs], float)
        o = np.array([r.max_tokens for r in rs], float)
        out[name] = {
            "count": len(rs),
            "share": len(rs) / len(reqs),
            "prompt_mean": float(p.mean()),
            "prompt_p50": float(np.percentile(p, 50)),
            "prompt_p99": float(np.percentile(p, 99)),
            "output_mean": float(o.mean()),
            "output_p50": float(np.percentile(o, 50)),
        }
    return out
