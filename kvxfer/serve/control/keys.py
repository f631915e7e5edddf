"""The registry layout of the control plane (values are JSON).

    /kvxfer/groups/<scenario>/<group>/spec            {"n_prefill", "n_decode"}          controller
    /kvxfer/groups/<scenario>/<group>/members/<name>  {"role", "url", "descriptor", "state",
                                                       "epoch", "pid", "message"}         member, leased
    /kvxfer/groups/<scenario>/<group>/order           {"epoch", "members": {name: role}} controller
    /kvxfer/routes/<scenario>/<group>                 {"epoch", "prefills": [url, ...]}  controller
    /kvxfer/standby/<name>                            {"state": "waiting", "pid"}        standby, leased
    /kvxfer/assign/<name>                             {"role", "scenario", "group"}      controller (CAS)

``members/<name>`` is the member's report, written under its health lease: when the process
dies its lease expires and the key disappears (the logical removal). ``order`` is the
*initialize order* [paper: Fig. 6, step 2]: the members of the group at an epoch; a member
connects to the peers it names and reports ``state: "healthy"`` for that epoch once every
connection is verified. ``routes`` is the gateways' forwarding table
``<scenario, prefill x A>`` [paper]: the controller writes it only with confirmed members, so a
gateway never routes to an unconfirmed one.

``standby/<name>`` is a stateless worker waiting for a role (no model loaded, not in any
group); a controller claims it by creating ``assign/<name>`` with compare-and-swap (so two
controllers never claim the same one). The standby then loads the role and reports under
``members/`` like any worker; it deletes both keys once its member report is written.
"""

from __future__ import annotations

import json
from typing import Any

ROOT = "/kvxfer/"
STATES = ("reported", "connected", "loaded", "healthy", "failed")


def group(scenario: str, grp: str) -> str:
    for part in (scenario, grp):
        if not part or "/" in part:
            from ..registry import RegistryError

            raise RegistryError(f"scenario and group names must be non-empty without '/': {part!r}")
    return f"{ROOT}groups/{scenario}/{grp}/"


def spec(scenario: str, grp: str) -> str:
    return group(scenario, grp) + "spec"


def members(scenario: str, grp: str) -> str:
    return group(scenario, grp) + "members/"


def member(scenario: str, grp: str, name: str) -> str:
    return members(scenario, grp) + name


def order(scenario: str, grp: str) -> str:
    return group(scenario, grp) + "order"


ROUTES = ROOT + "routes/"


def routes(scenario: str, grp: str) -> str:
    group(scenario, grp)
    return f"{ROUTES}{scenario}/{grp}"


STANDBY = ROOT + "standby/"
ASSIGN = ROOT + "assign/"


def standby(name: str) -> str:
    return STANDBY + name


def assignment(name: str) -> str:
    return ASSIGN + name


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


def loads(text: str) -> Any:
    return json.loads(text) if text else None
