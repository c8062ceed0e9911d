"""Exact vocabulary divergences against numbers worked by hand."""
import math

import torch

from learner.divergences import DIVERGENCES, exact_divergences, per_token_divergence

P = torch.tensor([0.5, 0.25, 0.25])
Q = torch.tensor([0.8, 0.1, 0.1])


def test_three_token_vocabulary_by_hand():
    # reverse KL(p||q) = 0.5 ln(0.5/0.8) + 2 * 0.25 ln(0.25/0.1) = -0.235002 + 0.458145 = 0.223144
    # forward KL(q||p) = 0.8 ln(0.8/0.5) + 2 * 0.1 ln(0.1/0.25) = 0.376003 - 0.183258 = 0.192745
    # JS: M = (0.65, 0.175, 0.175); KL(p||M) = 0.047156, KL(q||M) = 0.054188 -> 0.050672
    # TV = 0.5 (0.3 + 0.15 + 0.15) = 0.3
    logits, ref = P.log()[None] + 3.0, Q.log()[None] - 1.0     # shifts do not change a softmax
    expected = {"reverse_kl": 0.223144, "forward_kl": 0.192745, "js": 0.050672, "tv": 0.3}
    for name, value in expected.items():
        assert abs(DIVERGENCES[name](logits, ref).item() - value) < 1e-5, name


def test_identical_distributions_and_bounds():
    torch.manual_seed(0)
    z = torch.randn(7, 11) * 3
    for name in DIVERGENCES:
        torch.testing.assert_close(DIVERGENCES[name](z, z + 2.0), torch.zeros(7), atol=1e-6, rtol=0)
    a, b = torch.randn(50, 4) * 5, torch.randn(50, 4) * 5
    tv, js = DIVERGENCES["tv"](a, b), DIVERGENCES["js"](a, b)
    assert (tv >= 0).all() and (tv <= 1 + 1e-6).all()
    assert (js >= -1e-7).all() and (js <= math.log(2) + 1e-6).all()
    # disjoint supports reach both bounds: TV = 1, JS = ln 2
    inf = float("-inf")
    x, y = torch.tensor([[0.0, inf]]), torch.tensor([[inf, 0.0]])
    assert abs(DIVERGENCES["tv"](x, y).item() - 1.0) < 1e-6
    assert abs(DIVERGENCES["js"](x, y).item() - math.log(2)) < 1e-6


def test_zero_probabilities_are_zero_log_zero():
    # p = (1, 0, 0), q = (0.5, 0.25, 0.25): KL(p||q) = ln 2, with a finite gradient
    z = torch.tensor([[[0.0, float("-inf"), float("-inf")]]], requires_grad=True)
    ref = Q.new_tensor([0.5, 0.25, 0.25]).log()[None, None]
    val = per_token_divergence("reverse_kl", z, ref)
    val.sum().backward()
    assert abs(val.item() - math.log(2)) < 1e-6 and torch.isfinite(z.grad).all()
    for name in ("js", "tv"):
        z.grad = None
        v = per_token_divergence(name, z, ref)
        v.sum().backward()
        assert torch.isfinite(v).all() and torch.isfinite(z.grad).all(), name


def test_chunked_equals_unchunked_with_gradients():
    torch.manual_seed(1)
    B, T, V = 3, 5, 7
    base, ref = torch.randn(B, T, V), torch.randn(B, T, V)
    for name in DIVERGENCES:
        outs = []
        for chunk in (1, 4, 1000):
            logits = base.clone().requires_grad_()
            d = per_token_divergence(name, logits, ref, chunk=chunk)
            (d * torch.arange(B * T, dtype=torch.float32).reshape(B, T)).sum().backward()
            outs.append((d.detach(), logits.grad))
        for d, g in outs[:2]:
            torch.testing.assert_close(d, outs[2][0], msg=name)
            torch.testing.assert_close(g, outs[2][1], msg=name)


def test_reverse_kl_gradient_matches_the_formula():
    # d KL(p||q) / d z_v = p_v (log p_v - log q_v - KL)
    torch.manual_seed(2)
    z, ref = torch.randn(2, 3, 5, requires_grad=True), torch.randn(2, 3, 5)
    kl = per_token_divergence("reverse_kl", z, ref, chunk=2)
    kl.sum().backward()
    lp, lq = torch.log_softmax(z.detach(), -1), torch.log_softmax(ref, -1)
    torch.testing.assert_close(z.grad, lp.exp() * (lp - lq - kl.detach()[..., None]))


def test_exact_divergences_are_masked_means():
    torch.manual_seed(3)
    logits, ref = torch.randn(2, 4, 6, requires_grad=True), torch.randn(2, 4, 6)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    out = exact_divergences(logits, ref, mask, chunk=3)
    assert set(out) == {"div_reverse_kl", "div_forward_kl", "div_js", "div_tv"}
    for name in DIVERGENCES:
        per = per_token_divergence(name, logits, ref).detach()
        torch.testing.assert_close(out[f"div_{name}"], (per * mask).sum() / 4)
        assert not out[f"div_{name}"].requires_grad
