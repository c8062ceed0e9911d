"""Multi-turn samples: the loss mask keeps observation tokens out of the loss, the gradient and the
token accounting; a mask of all ones is today's single-turn computation exactly."""
import pytest
import torch

from learner.algorithms import aggregation_units, grpo_loss, token_logprobs
from learner.batch import completion_logits, micros
from learner.rl import Prepared
from tests.unit.test_batch import tiny_model

# two samples of one prompt: a model turn, an observation (tool output + template), a second turn
PROMPT = [1, 2, 3]
SHARD = {
    "prompt_token_ids": [PROMPT, PROMPT],
    "completion_token_ids": [[5, 6, 7, 30, 31, 32, 8, 9], [10, 11]],
    "loss_mask": [[1, 1, 1, 0, 0, 0, 1, 1], [1, 1]],
}


def _shard(**extra):
    return {k: [list(x) for x in v] for k, v in SHARD.items() if k != "loss_mask"} | extra


@pytest.mark.parametrize("shared_prefix", [False, True])
def test_the_mask_reaches_the_micro_batch(shared_prefix):
    (mb,) = micros(_shard(loss_mask=SHARD["loss_mask"]), [0, 1], 2, 0, "cpu", shared_prefix)
    want = {0: [1, 1, 1, 0, 0, 0, 1, 1], 1: [1, 1, 0, 0, 0, 0, 0, 0]}
    for j, i in enumerate(mb.rows):
        assert mb.comp_mask[j].tolist() == want[i]
    assert aggregation_units("token-mean", mb.comp_mask) == 7  # the model's tokens, not the observation's


def _loss(shard, shared_prefix=True, aggregation="token-mean"):
    model = tiny_model().train()
    model.zero_grad()
    (mb,) = micros(shard, [0, 1], 2, 0, "cpu", shared_prefix)
    sel = completion_logits(model, mb)
    sel.retain_grad()
    logp = token_logprobs(sel, mb.comp_ids)
    old = torch.full_like(logp, -3.9)  # fixed pi_old: the loss is a function of the logits
    adv = torch.tensor([1.0, -0.5])[[mb.rows.index(0), mb.rows.index(1)]]
    loss, _ = grpo_loss(logp, old, old - 0.2, adv, mb.comp_mask, 0.2, 0.04, "k3", aggregation=aggregation,
                        norm_len=8, is_weights=torch.full_like(logp, 1.5))
    loss.backward()
    return loss, sel.grad, mb


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("shared_prefix", [False, True])
def test_a_mask_of_ones_is_the_single_turn_loss_exactly(aggregation, shared_prefix):
    ones = [[1] * len(c) for c in SHARD["completion_token_ids"]]
    plain, grad_plain, _ = _loss(_shard(), shared_prefix, aggregation)
    masked, grad_masked, _ = _loss(_shard(loss_mask=ones), shared_prefix, aggregation)
    assert torch.equal(plain, masked) and torch.equal(grad_plain, grad_masked)


def test_observation_tokens_get_no_gradient():
    _, grad, mb = _loss(_shard(loss_mask=SHARD["loss_mask"]))
    row = mb.rows.index(0)
    per_token = grad[row].abs().sum(-1)  # d loss / d logits predicting each completion token
    assert torch.all(per_token[3:6] == 0), per_token  # the observation
    assert torch.all(per_token[[0, 1, 2, 6, 7]] > 0), per_token  # the model's two turns


def test_observation_tokens_do_not_change_the_loss():
    """The observation is context only: with nothing sampled after it, whatever the tool returned
    leaves the loss as it was; a model turn after it does depend on it (as context)."""
    other = _shard(loss_mask=SHARD["loss_mask"])
    a, _, _ = _loss(other)
    other["completion_token_ids"][0][3:6] = [40, 41, 42]
    b, _, _ = _loss(other)
    # the second turn's logits depend on the observation as context, so compare a mask that ends before it
    assert not torch.equal(a, b)
    cut = {k: [list(x) for x in v] for k, v in _shard(loss_mask=SHARD["loss_mask"]).items()}
    cut["completion_token_ids"][0] = cut["completion_token_ids"][0][:6]
    cut["loss_mask"] = [[1, 1, 1, 0, 0, 0], [1, 1]]
    c, _, _ = _loss(cut)
    cut["completion_token_ids"][0][3:6] = [40, 41, 42]
    d, _, _ = _loss(cut)
    assert torch.equal(c, d)


def test_engine_learner_difference_counts_model_tokens_only():
    prep = Prepared()
    prep.old = {0: torch.tensor([-1.0, -2.0, -3.0, -4.0])}
    prep.engine = {0: torch.tensor([-1.5, -2.0, 0.0, 0.0])}  # no engine logprob for the observation
    prep.mask = {0: torch.tensor([1.0, 1.0, 0.0, 0.0])}
    stats = prep.stats()
    assert stats["logprob_tokens"] == 2 and stats["logprob_abs_diff_sum"] == pytest.approx(0.5)
