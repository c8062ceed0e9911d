"""wait_all names the member that died even when a survivor's broken collective fails first."""
import os
import time

import pytest
import ray

from learner.group import MemberDied, wait_all


@ray.remote
class Member:
    def fail_after(self, s: float) -> None:  # a survivor whose collective broke
        time.sleep(s)
        raise RuntimeError("Connection reset by peer")

    def die_after(self, s: float) -> None:
        time.sleep(s)
        os._exit(1)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_survivors_error_before_the_death_is_reported_still_names_the_dead(local_ray):
    a, b = Member.remote(), Member.remote()
    refs = [a.fail_after.remote(0.2), b.die_after.remote(1.5)]
    with pytest.raises(MemberDied, match="rank 1 died") as e:
        wait_all(refs, ["rank 0", "rank 1"], 60, "a training step")
    assert e.value.member == "rank 1"


def test_an_error_with_nobody_dead_is_raised_as_it_is(local_ray):
    a, b = Member.remote(), Member.remote()
    with pytest.raises(ray.exceptions.RayTaskError, match="Connection reset"):
        wait_all([a.fail_after.remote(0.2), b.fail_after.remote(0.4)], ["rank 0", "rank 1"], 60, "a step")
