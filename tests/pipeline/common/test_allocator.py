"""pipeline/common/allocator.py: a CPU teacher process reuses freed memory instead of faulting it in again."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kdcache.pipeline.common import allocator

pytestmark = pytest.mark.skipif(not allocator.enabled(), reason="glibc only")  # the CI machine is glibc Linux

# 64 MB blocks, allocated, written and freed 20 times, as a forward does with its activations.
_CHURN = """
import json, resource, sys
import torch
from kdcache.pipeline.common import allocator
tuned = allocator.tune_this_process() if sys.argv[1] == "tune" else False
def churn():
    for _ in range(20):
        a = torch.empty(16 << 20)  # torch, not numpy: numpy asks for huge pages, which fault 512x less
        a.fill_(1.0)
        del a
churn()  # first touch of the heap counts in neither case
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(json.dumps({"tuned": tuned, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(mode: str, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHURN, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})}, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tuned_process_reuses_large_blocks():
    plain, tuned = _faults("plain"), _faults("tune")
    assert tuned["tuned"] and not plain["tuned"]
    # 20 x 64 MB = 327,680 pages faulted in again without tuning; a reused block faults none.
    assert plain["faults"] > 100_000
    assert tuned["faults"] < plain["faults"] / 50


def test_worker_env_has_the_same_effect_and_can_be_turned_off():
    assert _faults("plain", allocator.worker_env())["faults"] < 2_000
    assert allocator.worker_env() == allocator.MALLOC_ENV
    off = _faults("tune", {"KDCACHE_MALLOC_TUNING": "0"})
    assert not off["tuned"] and off["faults"] > 100_000
