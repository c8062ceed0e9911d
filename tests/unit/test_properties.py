"""Properties that must hold for any input (hypothesis), kept small so the unit tier stays seconds."""
import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.algorithms import ADVANTAGES, process_advantages
from learner.divergences import DIVERGENCES

FAST = settings(max_examples=50, deadline=None)
# Multiples of 1/4 are exact in float32, so "all equal" groups really are equal.
reward = st.integers(-32, 32).map(lambda k: k / 4)
group_sizes = st.lists(st.integers(1, 6), min_size=1, max_size=4)


@st.composite
def grouped_rewards(draw):
    sizes = draw(group_sizes)
    rewards = torch.tensor([draw(reward) for _ in range(sum(sizes))])
    groups = torch.tensor([g for g, n in enumerate(sizes) for _ in range(n)])
    return rewards, groups


@FAST
@given(grouped_rewards(), st.integers(-40, 40).map(lambda k: k / 4))
def test_outcome_advantages_zero_mean_and_shift_invariant(data, shift):
    rewards, groups = data
    for name in ("grpo", "dr_grpo", "rloo"):
        adv = ADVANTAGES[name](rewards, groups)
        assert torch.isfinite(adv).all()
        for g in torch.unique(groups):
            assert abs(adv[groups == g].sum().item()) < 1e-4, name
        torch.testing.assert_close(ADVANTAGES[name](rewards + shift, groups), adv, atol=1e-4, rtol=1e-4)


@FAST
@given(st.data())
def test_process_advantages_normalized_steps_sum_to_zero_per_group(data):
    sizes = data.draw(group_sizes)
    B, length = sum(sizes), 8
    groups = torch.tensor([g for g, n in enumerate(sizes) for _ in range(n)])
    step_rewards, step_ends = [], []
    for _ in range(B):
        n = data.draw(st.integers(0, 4))
        step_rewards.append([data.draw(reward) for _ in range(n)])
        step_ends.append(sorted(data.draw(st.lists(st.integers(0, 10), min_size=n, max_size=n))))
    adv = process_advantages(step_rewards, step_ends, groups, length)
    assert adv.shape == (B, length) and torch.isfinite(adv).all()
    # Every step ends at or after token 0, so A_i0 is the sum of sample i's normalized step rewards.
    for g in torch.unique(groups):
        assert abs(adv[groups == g, 0].sum().item()) < 1e-4
    shift = data.draw(reward)
    shifted = process_advantages([[r + shift for r in rs] for rs in step_rewards], step_ends, groups, length)
    torch.testing.assert_close(shifted, adv, atol=1e-4, rtol=1e-4)


def _by_definition(z, y):
    """The four divergences with plain loops over the vocabulary, in float64 numpy."""
    p = np.exp(z - z.max()); p /= p.sum()
    q = np.exp(y - y.max()); q /= q.sum()
    m = (p + q) / 2
    kl = lambda a, b: sum(a[v] * math.log(a[v] / b[v]) for v in range(len(a)) if a[v] > 0)
    return {"reverse_kl": kl(p, q), "forward_kl": kl(q, p), "js": 0.5 * kl(p, m) + 0.5 * kl(q, m),
            "tv": 0.5 * sum(abs(p[v] - q[v]) for v in range(len(p)))}


logit = st.floats(-6, 6, allow_nan=False, width=32)


@FAST
@given(st.integers(2, 6).flatmap(lambda V: st.tuples(st.lists(logit, min_size=V, max_size=V),
                                                       st.lists(logit, min_size=V, max_size=V))))
def test_exact_divergences_match_their_definitions(pair):
    z, y = (np.array(v, dtype=np.float64) for v in pair)
    expected = _by_definition(z, y)
    zt, yt = torch.tensor(z, dtype=torch.float32)[None], torch.tensor(y, dtype=torch.float32)[None]
    for name, value in expected.items():
        got = DIVERGENCES[name](zt, yt).item()
        assert abs(got - value) < 1e-4 + 1e-4 * abs(value), (name, got, value)
    tv, js = DIVERGENCES["tv"](zt, yt).item(), DIVERGENCES["js"](zt, yt).item()
    assert -1e-6 <= tv <= 1 + 1e-6 and -1e-6 <= js <= math.log(2) + 1e-6
    assert DIVERGENCES["reverse_kl"](zt, yt).item() >= -1e-6 and DIVERGENCES["forward_kl"](zt, yt).item() >= -1e-6
