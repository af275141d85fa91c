"""Where work runs: the Ray connection (one place starts or joins a cluster) and the device and AMP
dtype of a forward (one rule for the teacher pass and for training)."""
from __future__ import annotations

import logging
import os
import torch


def init_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to RAY_ADDRESS / --address, or start a local cluster; True if this call started one.

    Never starts a second cluster inside a Ray job (RAY_ADDRESS is set there), and binds the local
    dashboard to loopback.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray's own "Connected to / Started a local Ray instance" lines go to the run's log (common.console):
    # which of the two happened is kdcache's to say.
    log = logging.getLogger("kdcache.runtime")
    if address:
        ray.init(address=address, log_to_driver=True)
        log.info("joined the Ray cluster at %s (%s CPUs)", address, ray.cluster_resources().get("CPU", 0))
        return False
    # address="local": a bare ray.init() would silently join the latest `ray start` cluster on this
    # machine (Ray reads /tmp/ray/ray_current_cluster); joining one is what --address / RAY_ADDRESS are for
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, dashboard_host="127.0.0.1", log_to_driver=True,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE":
                                       os.environ.get("HF_HUB_OFFLINE", "0")}})
    log.info("started a local Ray cluster (%s CPUs)", ray.cluster_resources().get("CPU", 0))
    return True


def amp_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a forward, teacher's or student's: `auto` = bf16 on a GPU, none on a CPU."""
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[choice]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
