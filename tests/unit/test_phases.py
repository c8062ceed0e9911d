"""Driver-side shaping and advantages (cluster/phases.py) on hand-made rollout tables."""
import pyarrow as pa
import torch

from cluster import phases
from learner.config import AlgorithmConfig


def table(rewards, lengths, groups, finish=None, steps=None):
    n = len(rewards)
    cols = {
        "group_id": pa.array(groups, pa.int32()),
        "prompt_token_ids": [[1, 2]] * n,
        "completion_token_ids": [[5] * L for L in lengths],
        "logprobs": [[0.0] * L for L in lengths],
        "finish_reason": finish or ["stop"] * n,
        "reward": pa.array(rewards, pa.float32()),
    }
    if steps is not None:
        cols["step_rewards"] = pa.array([[r for r, _ in s] for s in steps], pa.list_(pa.float32()))
        cols["step_ends"] = pa.array([[e for _, e in s] for s in steps], pa.list_(pa.int32()))
    return pa.table(cols)


def test_outcome_advantages_and_kl_in_reward():
    t = table([1.0, 0.0], [3, 3], [0, 0])
    plain = phases.with_advantages(t, AlgorithmConfig(advantage="dr_grpo"), [0.0, 0.0], 16)
    assert plain.column("advantage").to_pylist() == [0.5, -0.5]
    # kl in the reward: r - beta * sum_t kl = [1 - 0.5 * 1, 0 - 0.5 * 0] -> mean 0.25 -> +-0.25
    shaped = phases.with_advantages(t, AlgorithmConfig(advantage="dr_grpo", kl_in="reward", beta=0.5), [1.0, 0.0], 16)
    assert shaped.column("shaped_reward").to_pylist() == [0.5, 0.0]
    assert shaped.column("advantage").to_pylist() == [0.25, -0.25]


def test_soft_overlong_penalty_shapes_the_reward():
    # budget 10, buffer 4: length 6 is free, 8 costs (6 - 8) / 4 = -0.5, 10 costs -1
    t = table([1.0, 1.0, 1.0], [6, 8, 10], [0, 0, 0])
    out = phases.with_advantages(t, AlgorithmConfig(overlong={"buffer": 4}), [0.0] * 3, 10)
    assert out.column("shaped_reward").to_pylist() == [1.0, 0.5, 0.0]


def test_process_supervision_gives_per_token_advantages():
    # one group, two samples of 3 tokens; steps: A: (1.0 ends at 0), (0.0 ends at 2); B: (0.0 ends at 2)
    # pooled step rewards [1, 0, 0]: mean 1/3, sample std sqrt(1/3) -> normalized [1.1547, -0.5774, -0.5774]
    t = table([1.0, 0.0], [3, 3], [0, 0], steps=[[(1.0, 0), (0.0, 2)], [(0.0, 2)]])
    out = phases.with_advantages(t, AlgorithmConfig(supervision="process"), [0.0, 0.0], 16)
    a, b = out.column("advantage_tokens").to_pylist()
    torch.testing.assert_close(torch.tensor(a), torch.tensor([0.5774, -0.5774, -0.5774]), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(b), torch.tensor([-0.5774] * 3), atol=1e-4, rtol=0)
    shards = phases.train_shards(out, 1, 0, AlgorithmConfig(supervision="process"))
    assert len(shards[0]["advantage_tokens"][0]) == 3


def test_process_supervision_of_a_batch_without_steps_uses_each_reward_as_one_final_step():
    # rewards [1, 0] as steps ending at the last token: normalized +-0.7071 (mean 0.5, std 0.7071),
    # and every token of a sample sees its one step
    out = phases.with_advantages(table([1.0, 0.0], [2, 2], [0, 0]), AlgorithmConfig(supervision="process"), [0, 0], 8)
    a, b = out.column("advantage_tokens").to_pylist()
    torch.testing.assert_close(torch.tensor([a, b]), torch.tensor([[0.7071] * 2, [-0.7071] * 2]), atol=1e-4, rtol=0)


def test_ppo_leaves_advantages_to_the_learner():
    out = phases.with_advantages(table([1.0, 0.0], [2, 2], [0, 0]), AlgorithmConfig(name="ppo"), [0.3, 0.1], 8)
    assert "advantage" not in out.column_names
    shard = phases.train_shards(out, 1, 7, AlgorithmConfig(name="ppo"))[0]
    assert shard["reward"] == [1.0, 0.0] and shard["seed"] == 7  # ppo: KL goes in per token, on the learner
