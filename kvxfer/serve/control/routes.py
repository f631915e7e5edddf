"""The gateway's view of the forwarding table ``<scenario, prefill x A>`` in the registry.

:class:`RouteWatcher` reads every ``/kvxfer/routes/<scenario>/<group>`` key, merges the groups
of a scenario into one list of prefill URLs, and calls ``apply(routes)`` with the whole table
at start and after every change (from its watch thread)."""

from __future__ import annotations

from collections.abc import Callable

from ..registry import Registry, Watch
from . import keys


def read_routes(registry: Registry) -> dict[str, list[str]]:
    routes: dict[str, list[str]] = {}
    for e in registry.get_prefix(keys.ROUTES):
        scenario = e.key[len(keys.ROUTES) :].split("/", 1)[0]
        routes.setdefault(scenario, []).extend(keys.loads(e.value)["prefills"])
    return routes


class RouteWatcher:
    def __init__(self, registry: Registry, apply: Callable[[dict[str, list[str]]], None]) -> None:
        self.registry = registry
        self.apply = apply
        after = registry.revision()
        self.routes = read_routes(registry)
        apply(self.routes)
        self._watch = Watch(registry, keys.ROUTES, self._changed, after=after, poll_s=0.25)

    def _changed(self, _events: object) -> None:
        self.routes = read_routes(self.registry)
        self.apply(self.routes)

    def stop(self) -> None:
        self._watch.stop()
