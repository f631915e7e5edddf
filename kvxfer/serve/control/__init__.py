"""P/D-Serve's control plane over a registry (:mod:`kvxfer.serve.registry`): group setup,
health leases, recovery and scaling (:mod:`.controller`), the member agent that runs inside
each worker (:mod:`.member`), the gateway's route watcher (:mod:`.routes`), and the ratio
planner and online monitor (:mod:`.ratio`). The key layout is in :mod:`.keys`."""
