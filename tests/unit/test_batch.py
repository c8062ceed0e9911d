"""Padding, positions and completion logprobs against a plain full forward of a tiny model."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from learner.algorithms import entropy_from_logits, token_logprobs
from learner.attention import register, segments
from learner.batch import (completion_logits, length_sorted, make_micro, make_packed_micro, prompt_runs,
                           stack_padded)


def tiny_model(attn: str = "sdpa"):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attn).eval()


def test_make_micro_positions():
    mb = make_micro([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], rows=[0, 1], pad_id=0)
    assert mb.input_ids.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    assert mb.attention.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert mb.comp_index.tolist() == [[2, 3, 0], [0, 1, 2]] and mb.comp_row.tolist() == [0, 1]
    assert mb.comp_mask.tolist() == [[1, 1, 0], [1, 1, 1]]


def test_completion_logprobs_equal_a_full_forward_per_sequence():
    model = tiny_model()
    prompts, comps = [[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10, 11]]
    mb = make_micro(prompts, comps, rows=[0, 1], pad_id=0)
    with torch.no_grad():
        sel = completion_logits(model, mb)
        got, ent = token_logprobs(sel, mb.comp_ids), entropy_from_logits(sel)
        for i, (p, c) in enumerate(zip(prompts, comps)):
            logits = model(input_ids=torch.tensor([p + c])).logits[0]
            logp = torch.log_softmax(logits.float(), -1)
            want = torch.stack([logp[len(p) - 1 + t, tok] for t, tok in enumerate(c)])
            torch.testing.assert_close(got[i, : len(c)], want, atol=1e-5, rtol=1e-5)
            probs = logp.exp()[len(p) - 1: len(p) - 1 + len(c)]
            torch.testing.assert_close(ent[i, : len(c)], -(probs * logp[len(p) - 1: len(p) - 1 + len(c)]).sum(-1),
                                       atol=1e-5, rtol=1e-5)


def test_temperature_scales_logits():
    model = tiny_model()
    mb = make_micro([[1, 2]], [[3, 4]], rows=[0], pad_id=0)
    with torch.no_grad():
        hot = token_logprobs(completion_logits(model, mb, temperature=2.0), mb.comp_ids)
        logits = model(input_ids=mb.input_ids).logits[0, 1:3] / 2.0
    want = torch.log_softmax(logits, -1).gather(-1, torch.tensor([[3], [4]]))[:, 0]
    torch.testing.assert_close(hot[0], want, atol=1e-5, rtol=1e-5)


def test_stack_padded():
    got = stack_padded([torch.tensor([1.0]), torch.tensor([2.0, 3.0, 4.0])], 2)
    assert got.tolist() == [[1.0, 0.0], [2.0, 3.0]]


def _logprobs_and_grads(model, make, prompts, comps, weights):
    model.zero_grad()
    mb = make(prompts, comps, list(range(len(prompts))), 0)
    logp = token_logprobs(completion_logits(model, mb, temperature=0.7), mb.comp_ids) * mb.comp_mask
    (logp * weights[:, : logp.size(1)]).sum().backward()  # a loss that weighs every token differently
    return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attn", ["sdpa", register()])
@pytest.mark.parametrize("group_sizes", [(1,), (2, 3), (4, 1, 5), (8, 8)])
def test_shared_prefix_equals_unshared_logprobs_and_gradients(group_sizes, attn):
    """A group's prompt computed once for all its samples gives the logprobs and the parameter
    gradients of computing it once per sample: ragged prompts and completions, an empty completion.
    With SDPA the packed rows take the dense block mask; with learner/attention.py's implementation
    (what the learner loads) the prompt block and each completion's keys, nothing masked computed."""
    model = tiny_model(attn).train()
    g = torch.Generator().manual_seed(sum(group_sizes))
    prompts, comps = [], []
    for k in group_sizes:
        prompt = torch.randint(1, 50, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
        for _ in range(k):
            n = int(torch.randint(0, 9, (1,), generator=g))
            prompts.append(prompt)
            comps.append(torch.randint(1, 50, (n,), generator=g).tolist())
    weights = torch.randn(len(prompts), 9, generator=g)
    want, want_grads = _logprobs_and_grads(model, make_micro, prompts, comps, weights)
    got, got_grads = _logprobs_and_grads(model, make_packed_micro, prompts, comps, weights)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("make", [make_micro, make_packed_micro])
def test_the_head_at_completion_positions_equals_gathering_full_logits(make):
    """completion_logits projects only the positions that predict completion tokens: the same logits
    and parameter gradients as projecting every position and gathering; the model is left as it was."""
    model = tiny_model().train()
    prompts, comps = [[1, 2, 3]] * 3 + [[4, 5]], [[6, 7], [8], [9, 10, 11], [12, 13, 14, 15]]
    mb = make(prompts, comps, list(range(4)), 0)
    weights = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    results = []
    for logits in (lambda: mb.gather(model(**mb.inputs()).logits), lambda: completion_logits(model, mb)):
        model.zero_grad()
        sel = logits()
        (token_logprobs(sel, mb.comp_ids) * mb.comp_mask * weights).sum().backward()
        results.append((sel.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (want, want_grads), (got, got_grads) = results
    assert got.shape == want.shape == (4, 4, 50)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    assert model(**mb.inputs()).logits.shape[:2] == mb.input_ids.shape  # no hook left behind


def test_the_critic_takes_the_packed_layout(tmp_path):
    """PPO's value model reads the same micro-batches (and the packed attention's spans) as the policy:
    its values at completion positions equal the one-sample-a-row computation."""
    from learner.models import ValueModel
    tiny_model().save_pretrained(tmp_path)
    critic = ValueModel(str(tmp_path))
    torch.nn.init.normal_(critic.value_head.weight, generator=torch.Generator().manual_seed(1))
    prompts, comps = [[1, 2, 3]] * 3 + [[4, 5]], [[6, 7], [8], [9, 10, 11], [12, 13, 14, 15]]
    packed, plain = (make(prompts, comps, list(range(4)), 0) for make in (make_packed_micro, make_micro))
    assert "gf_segments" in packed.inputs()
    with torch.no_grad():
        got, want = (mb.gather(critic(**mb.inputs())) * mb.comp_mask for mb in (packed, plain))
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_segments_of_a_packed_row():
    """Row 0 = prompt [0, 3), completions at 3 (2 tokens) and 5 (1); row 1 = prompt [0, 1), one at 1 (2)."""
    seg = segments([3, 1], [(0, 3, 2), (0, 5, 1), (1, 1, 2)], length=6)
    assert seg.prompt_len == 3
    assert seg.queries.tolist() == [[3, 4], [5, 0], [7, 8]]
    assert seg.keys.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 5, 0], [6, 0, 0, 7, 8]]
    assert seg.allowed[0, 0].int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert seg.allowed[1, 0].int().tolist() == [[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]]  # a padding query: one key
    assert seg.allowed[2, 0].int().tolist() == [[1, 0, 0, 1, 0], [1, 0, 0, 1, 1]]
    assert seg.written.tolist() == [3, 4, 5, 7, 8]


def test_packed_layout_one_row_per_prompt():
    mb = make_packed_micro([[1, 2], [1, 2], [3]], [[5, 6], [7], [8, 9]], rows=[0, 1, 2], pad_id=0)
    assert mb.input_ids.tolist() == [[1, 2, 5, 6, 7], [3, 8, 9, 0, 0]]
    assert mb.position_ids.tolist()[0] == [0, 1, 2, 3, 2]  # the second completion starts after the prompt
    assert mb.comp_row.tolist() == [0, 0, 1]
    assert mb.comp_index.tolist() == [[1, 2], [1, 0], [0, 1]]
    attend = mb.attention[0, 0].int().tolist()
    assert attend[4] == [1, 1, 0, 0, 1]  # completion 2 sees the prompt and itself, not completion 1


def _shard(prompt_lens, comp_lens):
    prompts = [[g + 1] * n for g, n in enumerate(prompt_lens)]
    group = [g for g, lens in enumerate(comp_lens) for _ in lens]
    return {"prompt_token_ids": [prompts[g] for g in group],
            "completion_token_ids": [[7] * n for lens in comp_lens for n in lens], "seed": 3}


def test_length_sorted_keeps_groups_whole_shortest_first():
    shard = _shard([4, 2], [[5, 1, 3], [2, 2]])  # rows 0-2 group 0 (packed 13), rows 3-4 group 1 (6)
    assert length_sorted(shard, [0, 1, 2, 3, 4]) == [3, 4, 1, 2, 0]
    assert prompt_runs(shard, [0, 3, 1, 2]) == [[0], [3], [1, 2]]


def test_minibatches_hold_whole_groups_every_row_once():
    from learner.rl import minibatch_orders
    shard = _shard([3, 3, 3, 3], [[1] * 4] * 4)
    orders = minibatch_orders(shard, epochs=2, minibatches=2)
    assert len(orders) == 2 and all(len(e) == 2 for e in orders)
    for epoch in orders:
        assert sorted(i for mb in epoch for i in mb) == list(range(16))
        for mb in epoch:
            assert {i // 4 for i in mb} == {mb[0] // 4, mb[-1] // 4} and len({i // 4 for i in mb}) == 2
    assert orders == minibatch_orders(shard, epochs=2, minibatches=2)  # from the shard's seed


def test_logged_statistics_take_evenly_spaced_real_tokens():
    from learner.config import AlgorithmConfig
    from learner.rl import sampled, stats_stride
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)  # 9 real tokens
    assert sampled(mask, 1).tolist() == mask.bool().tolist()
    picked = sampled(mask, 3)
    assert picked.sum() == 3 and not (picked & ~mask.bool()).any()
    assert picked.tolist() == [[True, False, False, False], [True, False, False, False], [False, True, False, False]]
    shard = {"completion_token_ids": [[1] * 700, [1] * 700]}
    assert stats_stride(shard, AlgorithmConfig()) == 2  # 1400 tokens, at most ~1024 taken
    assert stats_stride(shard, AlgorithmConfig(stats_tokens=0)) == 1
    assert stats_stride({"completion_token_ids": [[1] * 30]}, AlgorithmConfig()) == 1
