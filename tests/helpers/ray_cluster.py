"""A real multi-node Ray cluster on this machine for tests (``ray.cluster_utils.Cluster``): a
head without CPUs and ``workers`` nodes of one CPU each, the driver connected."""

from __future__ import annotations

import os
from collections.abc import Iterator


def local_cluster(workers: int = 2) -> Iterator[tuple]:
    """Yields (cluster, worker nodes); shuts both the driver and the cluster down after."""
    import signal

    import ray
    from ray.cluster_utils import Cluster

    # Ray's nodes install their own SIGINT/SIGTERM handlers in this process: put ours back after
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    os.environ.pop("RAY_ADDRESS", None)
    c = Cluster(initialize_head=True, connect=False,
                head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [c.add_node(num_cpus=1) for _ in range(workers)]
    c.wait_for_nodes()
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    try:
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
