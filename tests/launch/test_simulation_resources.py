"""The simulation launcher gives Ray the cores and GPUs each simulated node may use."""

import pytest

from photon.config import load_config
from photon.launch.simulation import simulation_resources


@pytest.mark.parametrize("nodes,procs,cpus,gpus,workers,res", [
    (2, 1, 2, 0, 2, {"num_cpus": 1.0, "num_gpus": 0.0}),
    (4, 1, 2, 0, 2, {"num_cpus": 1.0, "num_gpus": 0.0}),
    (4, 1, 16, 8, 4, {"num_cpus": 4.0, "num_gpus": 1.0}),   # a node per GPU, all nodes at once
    (8, 2, 16, 8, 4, {"num_cpus": 4.0, "num_gpus": 2.0}),   # 2-rank clients: 4 nodes at a time
    (2, 4, 8, 2, 1, {"num_cpus": 8.0, "num_gpus": 2.0}),    # more ranks than GPUs: share what there is
])
def test_simulated_nodes_get_their_share_of_cores_and_gpus(nodes, procs, cpus, gpus, workers, res):
    cfg = load_config("tiny", [f"federation.num_nodes={nodes}", f"federation.procs_per_node={procs}"])
    assert simulation_resources(cfg, cpus, gpus) == (workers, res)
