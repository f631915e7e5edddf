"""P/D-Serve on kvxfer: prefill and decode workers, KV transfer paths, the gateway, local
deployments (``kvxfer serve``). See docs/pd-serve.md.

Submodules are imported on demand (torch and aiohttp are the ``serve`` extras)::

    from kvxfer.serve.deployment import start_local
    with start_local(n_prefill=1, n_decode=1, model="tiny") as dep:
        print(dep.gateway_url, dep.prefill_urls, dep.decode_urls)
"""
