"""``python -m cluster.node ARGS``: ``ray start ARGS`` for a worker node that stays on loopback.

Ray refuses to start a non-head node while ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (the switch
that keeps the head on 127.0.0.1, see ``cluster.head``), and with it on it replaces
``--node-ip-address 127.0.0.1`` by the machine's outward address. Here the switch is on for
this process's check only, the address resolution answers loopback, and every process the
node starts inherits the switch off, so nothing of the node listens outside 127.0.0.1.
"""

import os
import sys


def main() -> None:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for the raylet, its agents and workers
    from ray._private import ray_constants, services

    ray_constants.ENABLE_RAY_CLUSTER = True  # `ray start --address` checks it in this process only
    services.node_ip_address_from_perspective = lambda address=None: "127.0.0.1"
    services.resolve_ip_for_localhost = lambda host: host
    from ray.scripts.scripts import cli

    cli(args=["start", *sys.argv[1:]], prog_name="ray")


if __name__ == "__main__":
    main()
