"""The ``pdjax`` command (``pip install .`` puts it on the PATH).

  pdjax serve [MODEL] [flags]   a whole deployment on this machine: router,
                                prefill and decode pools, optional gateway
                                (pdjax.launch.local); --prompt=TEXT
                                generates once and exits
  pdjax bench [flags]           offer a workload and measure it
                                (pdjax.eval.cli; the eval extra)
  pdjax plan [flags]            size the pools from a measured sweep
                                (pdjax.planner.cli)

Each subcommand is an absl program with its own flags (``pdjax serve
--help``); the deployment files, sharding rules and chat templates it
names by default ship inside the package, so it runs from any directory.
``pdjax serve MODEL`` is ``pdjax serve --checkpoint=MODEL``, as
``vllm serve MODEL``. The pools' processes are the launchers
``python -m pdjax.launch.{prefill,decode,router,gateway}``, which run on
their own where a deployment spans machines.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "serve": ("pdjax.launch.local", "run a deployment on this machine"),
    "bench": ("pdjax.eval.cli", "offer a workload to a deployment and "
              "measure it"),
    "plan": ("pdjax.planner.cli", "size the pools from a measured sweep"),
}


def usage() -> str:
  lines = ["usage: pdjax COMMAND [flags]   (pdjax COMMAND --help for its "
           "flags)", "", "commands:"]
  lines += [f"  {name:<6} {about}" for name, (_, about) in COMMANDS.items()]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int | None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    return 0 if len(argv) >= 2 else 2
  command, rest = argv[1], argv[2:]
  if command not in COMMANDS:
    print(f"pdjax: unknown command {command!r}\n\n{usage()}",
          file=sys.stderr)
    return 2
  if command == "serve" and rest and not rest[0].startswith("-"):
    rest = [f"--checkpoint={rest[0]}", *rest[1:]]
  module = importlib.import_module(COMMANDS[command][0])
  module.run([f"pdjax {command}", *rest])
  return 0


if __name__ == "__main__":
  sys.exit(main())
