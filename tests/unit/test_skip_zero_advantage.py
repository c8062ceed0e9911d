"""Work the update skips where it adds nothing: samples whose advantages are all zero (beta = 0), and
the reference model when nothing reads pi_ref. The weights after the update equal computing it all, on
a real DeepSpeed engine (one gloo rank, in a process of its own so this one's torch.distributed stays
untouched)."""
import multiprocessing
import os

import pytest
import torch

from learner.config import AlgorithmConfig
from learner.rl import skips_zero_advantage, update_rows

GROUPS = ((0.0,) * 4, (1.0, 0.0, 0.0, 1.0), (1.0,) * 4, (0.0, 1.0, 0.0, 0.0))  # rewards of 4 groups of 4


def _shard() -> dict:
    from learner.algorithms import ADVANTAGES
    g = torch.Generator().manual_seed(0)
    shard = {k: [] for k in ("prompt_token_ids", "completion_token_ids", "logprobs", "finish_reason")}
    rewards, groups = [], []
    for gid, rs in enumerate(GROUPS):
        prompt = torch.randint(1, 50, (3 + gid,), generator=g).tolist()
        for r in rs:
            comp = torch.randint(1, 50, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
            shard["prompt_token_ids"].append(prompt)
            shard["completion_token_ids"].append(comp)
            shard["logprobs"].append([-1.0] * len(comp))
            shard["finish_reason"].append("stop")
            rewards.append(r)
            groups.append(gid)
    shard["advantage"] = ADVANTAGES["grpo"](torch.tensor(rewards), torch.tensor(groups), eps=1e-6).tolist()
    return shard | {"seed": 3, "batch_id": 1}


def _train(model_dir: str, port: int, config: dict, minibatches: int) -> dict:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      DS_ACCELERATOR="cpu")
    import deepspeed

    from learner import rl
    from learner.config import LearnerConfig
    from learner.models import build_engines, micro_size, quiet
    import transformers
    quiet(deepspeed, transformers)
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    cfg = LearnerConfig(micro_batch_size=2, minibatches=minibatches, lr=1e-2, zero_stage=1, dtype="float32")
    out = {}
    # every sample computed; zero-advantage ones skipped; skipped and no divergence log, so no pi_ref at all
    for skip, logged in ((False, True), (True, True), (True, False)):
        algo = AlgorithmConfig(**config, log_divergences=logged)
        shard = _shard()
        engines = build_engines(cfg, model_dir, 1, 16, with_ref=algo.uses_reference, with_critic=False,
                                critic_lr=1e-5)
        size = micro_size(cfg, 16)
        first = rl.minibatch_orders(shard, 1, minibatches)[0][0]
        prep, _ = rl.prepare(engines, shard, algo, 1.0, size, 0, torch.device("cpu"), True, first)
        stats = rl.train(engines, shard, prep, algo, 1, minibatches, 1.0, size, 0, 8, torch.device("cpu"),
                         True, skip_zero_advantage=skip)
        out[skip, logged] = ({n: p.detach().clone() for n, p in engines["policy"].module.named_parameters()},
                             stats["update_skipped_fraction"], engines["policy"].global_steps, sorted(engines))
    return out


@pytest.mark.parametrize("minibatches", [1, 2])
def test_skipping_zero_advantage_samples_leaves_the_update_unchanged(tmp_path, minibatches):
    from tests.unit.test_batch import tiny_model
    from weightsync.torch_dist import free_port
    tiny_model().save_pretrained(tmp_path)
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # raises what the process raised
        out = pool.apply(_train, (str(tmp_path), free_port(), {"name": "grpo", "beta": 0.0}, minibatches))
    (full, none_skipped, steps_full, _), (skipped, fraction, steps_skipped, _) = out[False, True], out[True, True]
    assert none_skipped == 0 and fraction > 0.2  # two of the four groups have all-equal rewards
    assert steps_full == steps_skipped == minibatches  # one optimizer step per minibatch either way
    start = tiny_model().state_dict()
    assert any(not torch.equal(full[n], start[n]) for n in full)  # the update did move the weights
    no_ref, _, _, engines = out[True, False]
    assert engines == ["policy"]  # beta = 0 and nothing logged of pi_ref: no reference model
    for name, weight in full.items():
        torch.testing.assert_close(skipped[name], weight, atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(no_ref[name], weight, atol=1e-6, rtol=1e-5, msg=name)


def test_which_objectives_read_the_reference():
    assert AlgorithmConfig(name="grpo").uses_reference  # beta 0.04 in the loss
    assert AlgorithmConfig(name="grpo", beta=0.0).uses_reference  # the divergences are logged
    assert not AlgorithmConfig(name="grpo", beta=0.0, log_divergences=False).uses_reference
    assert not AlgorithmConfig(name="grpo", kl_in="none", log_divergences=False).uses_reference
    assert AlgorithmConfig(name="ppo", log_divergences=False).uses_reference  # the KL in the reward


def test_which_objectives_skip():
    assert skips_zero_advantage(AlgorithmConfig(name="grpo", beta=0.0))
    assert skips_zero_advantage(AlgorithmConfig(name="dr_grpo", kl_in="none"))
    assert not skips_zero_advantage(AlgorithmConfig(name="grpo", beta=0.04))  # the KL's gradient remains
    assert not skips_zero_advantage(AlgorithmConfig(name="grpo", beta=0.0, entropy_coef=0.01))
    assert not skips_zero_advantage(AlgorithmConfig(name="ppo", beta=0.0))


def test_fillers_make_whole_micro_batches_only_where_needed():
    shard = {"advantage": [0.0, 0.5, 0.0, 0.0, -0.5, 0.0], "completion_token_ids": [[1] * n for n in (5, 1, 3, 2, 4, 6)]}
    cpu = torch.device("cpu")
    assert update_rows(shard, list(range(6)), 2, cpu) == [1, 4]  # one micro-batch of the two nonzero
    assert update_rows(shard, list(range(6)), 4, cpu) == [1, 4]
    all_zero = {**shard, "advantage": [0.0] * 6}
    assert update_rows(all_zero, list(range(6)), 2, cpu) == [1]  # one micro-batch still: the shortest row
    tokens = {"advantage_tokens": [[0.0, 0.0], [0.0, 0.1], [0.0], [0.0], [0.0], [0.0]],
              "completion_token_ids": shard["completion_token_ids"]}
    assert update_rows(tokens, list(range(6)), 2, cpu) == [1]
