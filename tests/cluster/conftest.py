"""One real Ray cluster for the whole test run, shared by every cluster test.

It has three nodes on this machine, one per role, as a production cluster would: the head
(where the tests' driver runs) is the trusted node, one node runs agents, one runs tool
workers. Each is a real raylet; every job in these tests is placed across them."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Roles:
    address: str
    trusted: str  # node ids
    agent: str
    sandbox: str


@pytest.fixture(scope="session")
def ray_instance():
    import ray
    from ray.cluster_utils import Cluster

    os.chdir(ROOT)  # workers import agents.* and tests.* from the project directory
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"warden_trusted": 1000}, "include_dashboard": False})
    agent = cluster.add_node(num_cpus=2, resources={"warden_agent": 1000})
    sandbox = cluster.add_node(num_cpus=2, resources={"warden_sandbox": 1000})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    yield Roles(address=cluster.address, trusted=cluster.head_node.node_id, agent=agent.node_id, sandbox=sandbox.node_id)
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    """Each test's job writes its run directory (audit log, workspace) under tmp_path."""
    return tmp_path
