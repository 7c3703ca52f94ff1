"""Shared test set-up: small thread counts (2-core machines) and an offline guarantee."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a model hub
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ray_local():
    """A real Ray on 127.0.0.1 with two CPUs for one test module (started once: Ray takes seconds to start)."""
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024**2,
             _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()
