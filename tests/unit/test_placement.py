"""Placement as config, on a real (local, one-node) Ray: custom resources pin a role to a node type;
a role whose node type the cluster lacks is refused with a message that names what it asked for."""
import pytest
import ray

from cluster.config import Config, ConfigError, RolePlacement, load_config
from cluster.placement import _reserve


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, resources={"gpu_node": 1}, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_role_lands_on_the_node_type_it_names(cluster):
    pg, opts = _reserve("test-engines", [{"CPU": 0.5}, {"CPU": 0.5}],
                        RolePlacement(strategy="SPREAD", resources={"gpu_node": 0.25}), 30)
    try:
        table = ray.util.placement_group_table(pg)
        assert table["strategy"] == "SPREAD"
        assert all(b == {"CPU": 0.5, "gpu_node": 0.25} for b in table["bundles"].values())
        assert ray.available_resources().get("gpu_node", 0) == pytest.approx(0.5)
        assert len(opts) == 2
    finally:
        ray.util.remove_placement_group(pg)


def test_a_node_type_the_cluster_lacks_is_named(cluster):
    with pytest.raises(TimeoutError, match=r"'test-rewards' \(PACK, \[\{'CPU': 0.5, 'cpu_node': 0.01\}\]\)"):
        _reserve("test-rewards", [{"CPU": 0.5}], RolePlacement(resources={"cpu_node": 0.01}), 3)


def test_placement_config_is_validated():
    cfg = load_config(None, ["placement.engines.strategy=STRICT_SPREAD", "placement.learner.resources={gpu_node: 0.01}"])
    assert isinstance(cfg, Config) and cfg.placement.learner.resources == {"gpu_node": 0.01}
    with pytest.raises(ConfigError, match="come from the role's own config"):
        load_config(None, ["placement.rewards.resources={CPU: 2}"])
    with pytest.raises(ConfigError, match="placement.engines.strategy"):
        load_config(None, ["placement.engines.strategy=SCATTER"])
