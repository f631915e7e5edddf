"""The ``kvxfer`` command: ``kvxfer serve``, ``kvxfer experiment NAME``, ``kvxfer doctor``.

Each subcommand lives in its own module and is imported only when asked for, so
``kvxfer doctor`` works without the serving extras (torch, aiohttp) installed.
An experiment ``NAME`` is the module ``kvxfer.experiments.NAME`` with a ``main(argv)``.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

_COMMANDS = {
    "serve": ("kvxfer.serve.cli", "start a local P/D-Serve deployment (gateway + prefill + decode)"),
    "experiment": ("kvxfer.experiments", "run a paper comparison: kvxfer experiment NAME [--quick] [--json]"),
    "doctor": ("kvxfer.doctor", "check this host for kvxfer (memlock, RDMA, CUDA, shm, ports)"),
}


def _experiments() -> list[str]:
    import kvxfer.experiments as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def _usage() -> str:
    lines = ["usage: kvxfer COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in _COMMANDS.items()]
    lines += ["", "experiments: " + ", ".join(_experiments())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in _COMMANDS:
        print(f"kvxfer: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if command == "experiment":
        names = _experiments()
        if not rest or rest[0] in ("-h", "--help"):
            print("usage: kvxfer experiment NAME [--quick] [--json] [--plot FILE]\n")
            print("experiments: " + ", ".join(names))
            return 0 if rest else 2
        if rest[0] not in names:
            print(f"kvxfer: unknown experiment {rest[0]!r}; known: {', '.join(names)}", file=sys.stderr)
            return 2
        module = importlib.import_module(f"kvxfer.experiments.{rest[0]}")
        return int(module.main(rest[1:]) or 0)
    module = importlib.import_module(_COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
