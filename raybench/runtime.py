"""The one way raybench starts or joins Ray (training, sweeps, benchmarks; Serve next)."""

from __future__ import annotations

import os

# Workers of a local Ray must not reach a model hub either (tests and jobs set these on the
# driver; Ray does not pass the driver's environment to the workers it starts).
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def init_ray(address: str | None = None, *, log_to_driver: bool = True, include_dashboard: bool = True,
             num_cpus: int | None = None) -> bool:
    """Join `address` or `RAY_ADDRESS` when either is set (a cluster, or `ray job submit`),
    else start Ray locally; `address="local"` always starts a local instance (a benchmark
    that must not share a cluster). Returns True when this call started a local instance (the caller
    then owns its shutdown); False when it joined a cluster or Ray was already up.

    "local", not Ray's default: without an address `ray.init()` would silently join any
    cluster a `ray start` left running on this machine (/tmp/ray/ray_current_cluster).
    `include_dashboard` and `num_cpus` apply to a local start only.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        # A job's own runtime env (`ray job submit --runtime-env-json`) must not be merged
        # with another one; the cluster's image/env keeps the hub offline there.
        ray.init(address=address, log_to_driver=log_to_driver)
        return False
    ray.init(address="local", log_to_driver=log_to_driver, include_dashboard=include_dashboard,
             num_cpus=num_cpus, runtime_env={"env_vars": dict(OFFLINE_ENV)})
    return True
