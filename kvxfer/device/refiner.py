"""Prompt refinement during the cloud's prefill.

[abstract] the cloud refines the prompt with the intermediate data of its prefill so the device
prefills less. [3rd-party] a refinement ratio is a knob; information loss is a failure mode.
[inferred] the intermediate data is attention mass: the cloud runs its prefill in chunks and the
last chunk, the observation window (the query's tokens, at least ``window``), returns how much
attention each prompt position receives from those queries in the model's last layers
(SnapKV-style). The refined prompt keeps the system part and the query whole and the
highest-mass tokens between them, in their original order, ``refined_len(L, rho, sys, q)`` in
all. The device prefills those token ids (positions renumbered, as for any shorter prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvxfer.device.errors import BadSettingsError
from kvxfer.device.lm import LM, KvState
from kvxfer.device.timing import refined_len

# The body before the observation window goes in chunks of this many tokens (a memory bound on
# the attention scores); fewer, larger chunks cost the cloud less than 512-token ones [our choice].
CHUNK = 4096


@dataclass
class CloudPrefill:
    first_token: int
    state: KvState
    mass: torch.Tensor | None  # [L] attention mass from the observation window


def cloud_prefill(lm: LM, ids: list[int], want_mass: bool, window: int = 32) -> CloudPrefill:
    """Chunked prefill of ``ids``; the last ``window`` tokens are one chunk that returns the
    attention mass when ``want_mass``."""
    if not ids:
        raise BadSettingsError("empty prompt")
    st = KvState()
    window = max(1, min(window, len(ids)))
    body = len(ids) - window
    for i in range(0, body, CHUNK):
        lm.extend(st, ids[i : min(i + CHUNK, body)])
    mass = lm.extend(st, ids[body:], return_attention_mass=want_mass)
    return CloudPrefill(st.next_token, st, mass)


def refine(ids: list[int], mass: torch.Tensor, rho: float, system_len: int, query_len: int) -> list[int]:
    """Indices of the kept tokens, ascending."""
    n = len(ids)
    if not 0 < rho <= 1:
        raise BadSettingsError(f"rho must be in (0, 1], got {rho}")
    if system_len < 0 or query_len < 0 or system_len + query_len > n:
        raise BadSettingsError(f"system ({system_len}) + query ({query_len}) exceed the prompt ({n})")
    if mass is None or mass.numel() != n:
        raise BadSettingsError("refine needs the attention mass of every prompt token")
    keep = refined_len(n, rho, system_len, query_len)
    lo, hi = system_len, n - query_len
    budget = keep - system_len - query_len
    middle = list(range(lo, hi))
    if budget >= len(middle):
        chosen = middle
    elif budget <= 0:
        chosen = []
    else:
        top = torch.topk(mass[lo:hi].float(), budget).indices
        chosen = sorted(int(i) + lo for i in top)
    return list(range(system_len)) + chosen + list(range(hi, n))
