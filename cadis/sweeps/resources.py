"""What a sweep asks of its Ray cluster: how many trials run at once on the cluster's
resources, and how many CPUs the task building the stored draws takes. Plain arithmetic on
the numbers Ray reports (the driver reads them): no Ray here.
"""

from __future__ import annotations

import math
import sys
from typing import Mapping, Sequence

from cadis.errors import CadisError
from cadis.sweeps.spec import SweepConfig, required_per_trial

# The most CPUs the task building the stored draws takes (before this sweep's trials).
STORE_BUILD_MAX_CPUS = 8.0
# Resources are floats (0.25 CPU): a comparison this close counts as equal.
RESOURCE_TOLERANCE = 1e-9


def concurrent_trials(sweep: SweepConfig, cluster: Mapping[str, float],
                      nodes: Sequence[Mapping[str, float]]) -> int:
    """``max_concurrent_trials``, lowered to what the cluster holds at once (trials that wait
    for each other's Train workers starve); an error when not even one trial fits, or when
    no single node holds one worker (its resources cannot be split over nodes)."""
    resources = sweep.resources
    if not any(node.get("CPU", 0.0) >= resources.cpus_per_worker - RESOURCE_TOLERANCE
               and node.get("GPU", 0.0) >= resources.gpus_per_worker - RESOURCE_TOLERANCE
               for node in nodes):
        largest = max(nodes, key=lambda node: (node.get("GPU", 0.0), node.get("CPU", 0.0)),
                      default={})
        raise CadisError(f"one worker needs {resources.cpus_per_worker:g} CPU and "
                         f"{resources.gpus_per_worker:g} GPU on one node; the largest node has "
                         f"{largest.get('CPU', 0.0):g} CPU and {largest.get('GPU', 0.0):g} GPU")
    need = required_per_trial(sweep)
    have = {key: float(cluster.get(key, 0.0)) for key in need}
    short = [f"{need[key]:g} {key} (the cluster has {have[key]:g})"
             for key in need if need[key] > have[key] + RESOURCE_TOLERANCE]
    if short:
        raise CadisError(f"one trial needs {' and '.join(short)}: lower resources.* or add "
                         f"nodes")
    fits = min(math.floor(have[key] / need[key] + RESOURCE_TOLERANCE)
               for key in need if need[key] > 0)
    if fits < sweep.max_concurrent_trials:
        print(f"max_concurrent_trials {sweep.max_concurrent_trials} lowered to {fits}: the "
              f"cluster holds {fits} trial(s) of {need['CPU']:g} CPU, {need['GPU']:g} GPU",
              file=sys.stderr, flush=True)
    return min(fits, sweep.max_concurrent_trials)


def store_cpus_now(nodes: Sequence[Mapping], available: Mapping[str, float],
                   per_worker: float) -> float:
    """:func:`store_build_cpus` for the cluster as Ray reports it now (``ray.nodes()``,
    ``ray.available_resources()``): the sweep's stores before its first trial, its test draws
    once the search has ended and the cluster is idle."""
    largest = max((node["Resources"].get("CPU", 0.0) for node in nodes if node["Alive"]),
                  default=1.0)
    return store_build_cpus(largest, available.get("CPU", 0.0), per_worker)


def store_build_cpus(largest_node: float, free: float, per_worker: float) -> float:
    """The CPUs the store-building task asks for (torch runs as many threads): this sweep's
    trials wait for the stores, so it takes what the largest node has, at most
    STORE_BUILD_MAX_CPUS, but never more than is free now, lest it wait for another sweep on
    the cluster to finish (seen: one sharing its stores asked for the whole node while the
    first's final stage held part of it); at least one worker's share."""
    return max(per_worker, min(largest_node, STORE_BUILD_MAX_CPUS, math.floor(free)))
