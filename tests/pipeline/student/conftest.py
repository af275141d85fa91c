"""Fixtures shared by the student-wing tests."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    import os

    import ray

    # The Ray Train controller polls its workers every 2 s by default: each fit would idle ~2 s at its
    # end and before noticing a failure. Read by the controller, so set before the cluster starts.
    saved = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.25"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)
        else:
            os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = saved
