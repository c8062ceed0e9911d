"""Padding, positions and completion logprobs against a plain full forward of a tiny model."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from learner.algorithms import entropy_from_logits, token_logprobs
from learner.batch import completion_logits, make_micro, stack_padded


def tiny_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_make_micro_positions():
    mb = make_micro([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], rows=[0, 1], pad_id=0)
    assert mb.input_ids.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    assert mb.attention.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert mb.comp_index.tolist() == [[2, 3, 0], [0, 1, 2]]
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
