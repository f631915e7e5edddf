"""One worker's configuration: what ``start_local`` passes to each worker process (as JSON)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .kv_transfer import MODES as TRANSFER_MODES

ROLES = ("prefill", "decode", "aggregated", "gateway", "standby")  # standby: no model until assigned
COMPUTE_MODES = ("real", "profiled")
POLICIES = ("reject-retry", "local-queue")
BACKENDS = ("shm", "tcp", "cuda_ipc")
# tiny and medium: seeded random weights (kvxfer.serve.runtime.RANDOM_MODELS); smollm2: real weights
MODELS = ("tiny", "medium", "smollm2")


@dataclass
class WorkerConfig:
    """Fields shared by every role; each role reads the ones it needs.

    ``b_p``: prefill slots (prompts admitted and not yet handed to a decode). ``b_d``: decode
    batch size (running + retrieving requests). ``pending``: decode's pending-KV queue cap.
    ``max_prompt_tokens`` sizes the prefill's contiguous KV buffers (reserved in advance).
    """

    role: str = "prefill"
    name: str = "worker"
    host: str = "127.0.0.1"
    port: int = 0
    backend: str = "shm"
    model: str = "tiny"  # "tiny" / "medium" (seeded random: tiny_config, medium_config) or "smollm2"
    seed: int = 0
    mode: str = "real"  # "real" | "profiled"
    profile: str = ""  # profiled mode: path of a profile JSON ("" = the model's default)
    policy: str = "reject-retry"  # prefill's default when the request carries no policy header
    b_p: int = 4
    b_d: int = 8
    pending: int = 2
    max_prompt_tokens: int = 512
    block_tokens: int = 16
    num_blocks: int = 0  # decode pool blocks (0 = enough for b_d requests of max length)
    max_new_tokens: int = 256  # decode's bound on max_tokens, sizes the pool with num_blocks=0
    transfer_mode: str = "block-free"
    per_layer: bool = False
    prefix_cache: bool = True
    prefix_min_tokens: int = 16
    decode_wait_s: float = 30.0  # how long a prefill keeps trying decodes (holding its slot)
    stream_idle_s: float = 60.0  # longest gap between two events from a decode
    torch_threads: int = 1
    device: str = "cpu"
    cpus: list[int] = dataclasses.field(default_factory=list)  # CPU affinity ([]: the parent's)
    # gateway role
    prefill_urls: list[str] = dataclasses.field(default_factory=list)
    routes: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    ttft_slo_s: float = 5.0
    tokenizer: str = ""  # "" = the model's ("bytes:512" for tiny and medium, "smollm2")
    # control plane (kvxfer.serve.control): "" = peers exchanged by start_local over HTTP
    registry: str = ""  # "sqlite:PATH" | "etcd://HOST:PORT": join a group through the registry
    scenario: str = "*"  # the group's scenario ("*": requests of every scenario without a group)
    group: str = "g0"
    lease_ttl_s: float = 2.0  # health lease; a dead member is removed within about this time

    def __post_init__(self) -> None:
        checks = [
            (self.role in ROLES, f"role {self.role!r} not in {ROLES}"),
            (self.mode in COMPUTE_MODES, f"mode {self.mode!r} not in {COMPUTE_MODES}"),
            (self.policy in POLICIES, f"policy {self.policy!r} not in {POLICIES}"),
            (self.backend in BACKENDS, f"backend {self.backend!r} not in {BACKENDS}"),
            (
                self.transfer_mode in TRANSFER_MODES,
                f"transfer_mode {self.transfer_mode!r} not in {TRANSFER_MODES}",
            ),
            (self.model in MODELS, f"model {self.model!r} not in {MODELS}"),
            (self.b_p >= 1 and self.b_d >= 1 and self.pending >= 0, "b_p, b_d must be >= 1, pending >= 0"),
            (self.max_prompt_tokens >= 1 and self.block_tokens >= 1, "max_prompt_tokens, block_tokens >= 1"),
            (all(isinstance(c, int) and c >= 0 for c in self.cpus), f"cpus {self.cpus!r}: CPU numbers >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        try:
            d: dict[str, Any] = json.loads(text)
            return cls(**d)
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"bad worker configuration: {e}") from e

    def replace(self, **kw: Any) -> WorkerConfig:
        return dataclasses.replace(self, **kw)
