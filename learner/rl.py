"""One rollout batch through the learner: `prepare` scores it under pi_old, pi_ref (and the critic),
then `train` runs epochs x minibatches of the configured objective. Plain functions over engines,
so the Ray actor stays a thin shell and the order of work reads top to bottom.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .algorithms import (AGGREGATIONS, KL_ESTIMATORS, aggregation_units, entropy, entropy_from_logits, grpo_loss, masked_mean,
                         tis_weights, token_logprobs)
from .batch import Micro, completion_logits, loss_mask, micros, prompt_runs, stack_padded
from .config import AlgorithmConfig
from .divergences import exact_divergences, per_token_divergence
from .ppo_math import gae, kl_shaped_rewards, masked_whiten, value_loss


@dataclass
class Prepared:
    """Per-row tensors of one shard, computed before the update that uses them (rows index the
    shard), and the token-weighted sums of the statistics logged about them."""
    old: dict[int, torch.Tensor] = field(default_factory=dict)
    ref: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    engine: dict[int, torch.Tensor] = field(default_factory=dict)
    keep: dict[int, float] = field(default_factory=dict)  # 0: masked out (overlong masking)
    mask: dict[int, torch.Tensor] = field(default_factory=dict)  # per token: 1 sampled by the model
    sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    tokens: float = 0.0
    stride: int = 1  # every stride-th completion token enters the full-vocabulary statistics

    def row_mask(self, rows: list[int], width: int) -> torch.Tensor:
        """[len(rows), width]: each row's loss mask, zero where overlong masking drops the sample."""
        return stack_padded([self.mask[i] * self.keep[i] for i in rows], width)

    def stats(self) -> dict:
        """The logged statistics of every row scored: divergences and entropy before the update,
        and the engine-vs-learner logprob difference (evidence the engines hold our weights)."""
        rows = [i for i in self.old if self.old[i].numel()]  # the model's own tokens only
        diff = sum(float(((self.old[i] - self.engine[i]).abs() * self.mask[i]).sum()) for i in rows)
        out = {f"{k}_pre" if k == "entropy" else k: v / max(self.tokens, 1.0) for k, v in self.sums.items()}
        out.update(logprob_abs_diff_sum=diff, logprob_tokens=int(sum(float(self.mask[i].sum()) for i in rows)),
                   tokens=self.tokens)
        return out


def reuses_policy(algo: AlgorithmConfig) -> bool:
    """Whether pi_old may come from the update's own forward where pi_theta = pi_old by construction
    (the first minibatch of the first epoch). Not when the KL enters the reward or a critic runs:
    both are needed for every sample before advantages exist, so pi_old is computed up front."""
    return algo.kl_place != "reward" and not algo.uses_critic


def stats_stride(shard: dict, algo: AlgorithmConfig) -> int:
    """Full-vocabulary statistics are memory-bound passes over [tokens, V]: on long completions they
    cost a fifth of the learner (py-spy, GSM8K shape), so they take an evenly spaced subset."""
    total = sum(len(c) for c in shard["completion_token_ids"])
    return max(1, -(-total // algo.stats_tokens)) if algo.stats_tokens else 1


def sampled(mask: torch.Tensor, stride: int) -> torch.Tensor:
    """The real tokens of a [B, C] mask, every stride-th of them (row-major), as a bool mask."""
    real = mask.bool()
    if stride == 1:
        return real
    return real & (real.flatten().cumsum(0) % stride == 1 % stride).view_as(real)


def minibatch_orders(shard: dict, epochs: int, minibatches: int) -> list[list[list[int]]]:
    """[epoch][minibatch] -> the shard's rows, from the shard's seed. Groups are shuffled whole, so a
    minibatch holds whole groups whose prompt the shared-prefix layout computes once."""
    n = len(shard["completion_token_ids"])
    per_mb = n // minibatches
    runs = prompt_runs(shard, list(range(n)))
    g = torch.Generator().manual_seed(int(shard.get("seed", 0)))
    out = []
    for _ in range(epochs):
        perm = [i for j in torch.randperm(len(runs), generator=g).tolist() for i in runs[j]]
        out.append([perm[k * per_mb: (k + 1) * per_mb] for k in range(minibatches)])
    return out


@torch.no_grad()
def _record(prep: Prepared, shard: dict, algo: AlgorithmConfig, mb: Micro, sel: torch.Tensor, old: torch.Tensor,
            ref_sel: torch.Tensor, ref: torch.Tensor, values: torch.Tensor | None) -> None:
    """A micro-batch's pi_old, pi_ref (and old values) per row, and its share of the logged statistics.
    `ref_sel` and `ref` are None where nothing reads pi_ref (no reference model)."""
    w = float(mb.comp_mask.sum())
    prep.tokens += w
    for name, estimator in KL_ESTIMATORS.items() if ref is not None else ():  # every sampled estimator
        prep.sums[f"kl_{name}"] += float(masked_mean(estimator(old, ref), mb.comp_mask)) * w
    # padding is often half of [B, C], and a subset of the real tokens estimates the mean well
    pick = sampled(mb.comp_mask, prep.stride)
    if pick.any():
        sel = sel[pick][None]
        ones = torch.ones(sel.shape[:2], device=sel.device)
        prep.sums["entropy"] += float(masked_mean(entropy_from_logits(sel), ones)) * w
        if algo.log_divergences:
            for k, v in exact_divergences(sel, ref_sel[pick][None], ones, algo.divergence_chunk).items():
                prep.sums[k] += float(v) * w
    for j, i in enumerate(mb.rows):
        c = len(shard["completion_token_ids"][i])
        prep.old[i] = old[j, :c].float()
        if ref is not None:
            prep.ref[i] = ref[j, :c].float()
        if values is not None:
            prep.values[i] = values[j, :c].float()


def global_sum(values: list[float], device, op=dist.ReduceOp.SUM) -> list[float]:
    """Sum (or `op`) over the learner ranks (DeepSpeed's default group); the values themselves with one rank."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t.tolist()


def accumulation_denom(local_units: float, accumulation_steps: int, device) -> float:
    """What each micro-batch's loss divides by so one optimizer step equals one pass over the whole
    minibatch: DeepSpeed divides each micro loss by its configured accumulation steps and averages
    over the ranks, so each divides by the minibatch's global unit count / (steps x ranks), however
    many micro-batches actually run."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return max(global_sum([local_units], device)[0], 1.0) / (accumulation_steps * world)


def skips_zero_advantage(algo: AlgorithmConfig) -> bool:
    """Whether a sample whose advantages are all zero adds nothing to the update's gradient: its
    policy-gradient term is ratio x 0 (clipped, dual-clipped or importance-weighted alike). Not when
    the loss holds a per-sample term beside it (the KL to pi_ref with beta > 0, an entropy bonus) or
    a critic trains on it."""
    return not algo.uses_critic and not algo.entropy_coef and (algo.kl_place != "loss" or algo.beta == 0)


def _zero_advantage(shard: dict, i: int) -> bool:
    if "advantage_tokens" in shard:
        return not any(shard["advantage_tokens"][i])
    return shard["advantage"][i] == 0


def update_rows(shard: dict, rows: list[int], size: int, device) -> list[int]:
    """The rows of a minibatch whose update is computed: those with a nonzero advantage (a group whose
    rewards are all equal has none). Zero-advantage rows, shortest first, fill in only where needed:
    one micro-batch at least (the optimizer still steps, with Adam's momentum, as unskipped) and as
    many micro-batches as the busiest rank (ZeRO's collectives run per forward and backward). Every
    rank calls this for every minibatch, in the same order."""
    zero = [i for i in rows if _zero_advantage(shard, i)]
    active = len(rows) - len(zero)
    need = int(global_sum([max(1, -(-active // size))], device, dist.ReduceOp.MAX)[0])
    zero.sort(key=lambda i: len(shard["completion_token_ids"][i]))
    keep = set(rows) - set(zero[max(0, (need - 1) * size + 1 - active):])
    return [i for i in rows if i in keep]


def _mask(mb: Micro, prep: Prepared) -> torch.Tensor:
    keep = torch.tensor([prep.keep[i] for i in mb.rows], device=mb.comp_mask.device)
    return mb.comp_mask * keep[:, None]


def _logprobs_or_none(sel: torch.Tensor | None, mb: Micro) -> torch.Tensor | None:
    return None if sel is None else token_logprobs(sel, mb.comp_ids)


@torch.no_grad()
def prepare(engines: dict, shard: dict, algo: AlgorithmConfig, temperature: float, size: int, pad_id: int,
            device, shared_prefix: bool = True, skip: list[int] = ()) -> tuple[Prepared, list[float]]:
    """pi_old / pi_ref logprobs and old values of every row but `skip` (rows whose update computes
    them itself), their logged statistics, and each sample's summed KL."""
    prep = Prepared(stride=stats_stride(shard, algo))
    n = len(shard["completion_token_ids"])
    for i in range(n):
        c = len(shard["completion_token_ids"][i])
        prep.engine[i] = torch.tensor(shard["logprobs"][i][:c], device=device, dtype=torch.float32)
        prep.mask[i] = loss_mask(shard, i).to(device)
        truncated = shard["finish_reason"][i] == "length"
        prep.keep[i] = 0.0 if (algo.overlong.mask_truncated and truncated) else 1.0
    skip = set(skip)
    for mb in micros(shard, [i for i in range(n) if i not in skip], size, pad_id, device, shared_prefix):
        sel = completion_logits(engines["policy"], mb, temperature)
        ref_sel = completion_logits(engines["ref"], mb, temperature) if "ref" in engines else None
        values = mb.gather(engines["critic"](**mb.inputs())) if "critic" in engines else None
        _record(prep, shard, algo, mb, sel, token_logprobs(sel, mb.comp_ids), ref_sel,
                _logprobs_or_none(ref_sel, mb), values)
        del sel, ref_sel
    estimator = KL_ESTIMATORS[algo.kl_estimator]
    kl_sums = [float((estimator(prep.old[i], prep.ref[i]) * prep.mask[i]).sum()) if i in prep.ref else 0.0
               for i in range(n)]
    return prep, kl_sums


def ppo_advantages(prep: Prepared, shard: dict, algo: AlgorithmConfig, device) -> tuple[dict, dict]:
    """GAE over per-token rewards: the outcome at the last token, minus beta * KL per token if kl_in=reward."""
    rows = list(range(len(shard["reward"])))
    width = max(1, max(prep.old[i].numel() for i in rows))
    mask = prep.row_mask(rows, width)
    kl = stack_padded([KL_ESTIMATORS[algo.kl_estimator](prep.old[i], prep.ref[i]) if i in prep.ref
                       else torch.zeros_like(prep.old[i]) for i in rows], width)
    beta = algo.beta if algo.kl_place == "reward" else 0.0
    outcome = torch.tensor(shard["reward"], dtype=torch.float32, device=device)
    token_rewards = kl_shaped_rewards(outcome, kl, mask, beta)
    values = stack_padded([prep.values[i] for i in rows], width)
    adv, returns = gae(token_rewards, values, mask, algo.ppo.gamma, algo.ppo.lam)
    if algo.ppo.whiten_advantages:  # over the whole batch: statistics summed over the ranks
        adv = masked_whiten(adv, mask, reduce=lambda stats: global_sum(stats, device))
    return ({i: adv[i, : prep.old[i].numel()] for i in rows},
            {i: returns[i, : prep.old[i].numel()] for i in rows})


def _advantages(mb: Micro, shard: dict, token_adv: dict | None, C: int, device) -> torch.Tensor:
    if token_adv is not None:
        return stack_padded([token_adv[i] for i in mb.rows], C)
    if "advantage_tokens" in shard:  # process supervision: one advantage per token
        return stack_padded([torch.tensor(shard["advantage_tokens"][i], device=device) for i in mb.rows], C)
    return torch.tensor([shard["advantage"][i] for i in mb.rows], device=device, dtype=torch.float32)


def train(engines: dict, shard: dict, prep: Prepared, algo: AlgorithmConfig, epochs: int, minibatches: int,
          temperature: float, size: int, pad_id: int, norm_len: int, device, shared_prefix: bool = True,
          skip_zero_advantage: bool = True) -> dict:
    """epochs x minibatches optimizer steps of the clipped objective (and the critic for ppo); rows
    that add nothing to the gradient are not computed (`update_rows`)."""
    policy, ref, critic = engines["policy"], engines.get("ref"), engines.get("critic")
    token_adv = returns = None
    if algo.uses_critic:
        token_adv, returns = ppo_advantages(prep, shard, algo, device)
    beta = algo.beta if algo.kl_place == "loss" else 0.0
    sums: dict[str, float] = defaultdict(float)
    count, ent_sum, ent_n, skipped, slots = 0, 0.0, 0, 0, 0
    for engine in (policy, critic):
        if engine is not None:
            engine.train()
    # one epoch: a row skipped in the first minibatch (whose pi_old the update computes) is never needed again
    skip = skip_zero_advantage and skips_zero_advantage(algo) and epochs == 1
    for epoch in minibatch_orders(shard, epochs, minibatches):
        for rows in epoch:
            computed = update_rows(shard, rows, size, device) if skip else rows
            batch = micros(shard, computed, size, pad_id, device, shared_prefix)
            skipped += len(rows) - len(computed)
            # every row counts in the normalization, computed or not: the gradient is unchanged
            units = aggregation_units(algo.aggregation,
                                      prep.row_mask(rows, max(1, max(prep.mask[i].numel() for i in rows))))
            denom = accumulation_denom(units, policy.gradient_accumulation_steps(), device)
            slots += policy.gradient_accumulation_steps()
            for k, mb in enumerate(batch):
                for engine in (policy, critic):  # the optimizer steps after this minibatch's last micro-batch
                    if engine is not None:
                        engine.set_gradient_accumulation_boundary(k == len(batch) - 1)
                C = mb.comp_ids.size(1)
                mask = _mask(mb, prep)
                sel = completion_logits(policy, mb, temperature)
                logp = token_logprobs(sel, mb.comp_ids)
                ref_sel = None
                if mb.rows[0] not in prep.old:  # not scored up front: pi_old is this very forward
                    if ref is not None:
                        with torch.no_grad():
                            ref_sel = completion_logits(ref, mb, temperature)
                    _record(prep, shard, algo, mb, sel.detach(), logp.detach(), ref_sel,
                            _logprobs_or_none(ref_sel, mb), None)
                old_lp = stack_padded([prep.old[i] for i in mb.rows], C)
                ref_lp = stack_padded([prep.ref[i] for i in mb.rows], C) if ref is not None else None
                pick = sampled(mask, prep.stride)
                ent = entropy(sel) if algo.entropy_coef else None
                div = None
                if algo.divergence and beta:
                    if ref_sel is None:
                        with torch.no_grad():
                            ref_sel = completion_logits(ref, mb, temperature)
                    div = per_token_divergence(algo.divergence, sel, ref_sel, algo.divergence_chunk)
                isw = None
                if algo.tis_cap:
                    isw = tis_weights(old_lp, stack_padded([prep.engine[i] for i in mb.rows], C), algo.tis_cap)
                    sums["tis_weight_mean"] += float(masked_mean(isw, mask))
                loss, stats = grpo_loss(
                    logp, old_lp, ref_lp, _advantages(mb, shard, token_adv, C, device), mask, algo.clip_eps, beta,
                    algo.kl_estimator, algo.clip_eps_high, algo.aggregation, norm_len, dual_clip=algo.dual_clip,
                    ratio_level=algo.ratio_level, is_weights=isw,
                    entropy=ent if algo.entropy_coef else None, entropy_coef=algo.entropy_coef, divergence=div,
                    denom=denom)
                policy.backward(loss)
                policy.step()  # DeepSpeed steps the optimizer at the accumulation boundary
                sums["loss"] += loss.item()
                if pick.any():  # logged on the same evenly spaced tokens as entropy_pre
                    picked = ent.detach()[pick] if ent is not None else entropy_from_logits(sel.detach()[pick][None])[0]
                    ent_sum, ent_n = ent_sum + float(picked.sum()), ent_n + picked.numel()
                for key in ("kl", "clip_fraction", "ratio_mean", "dual_clip_fraction"):
                    if key in stats:
                        sums[key] += float(stats[key])
                if critic is not None:
                    v = mb.gather(critic(**mb.inputs()))
                    vloss, vstats = value_loss(v, stack_padded([prep.values[i] for i in mb.rows], C),
                                               stack_padded([returns[i] for i in mb.rows], C), mask,
                                               algo.ppo.value_clip)
                    critic.backward(vloss)
                    critic.step()
                    sums["value_loss"] += vloss.item()
                    for key, val in vstats.items():
                        sums[key] += float(val)
                count += 1
    loss = sums.pop("loss", 0.0) / max(1, slots)  # per accumulation slot: a skipped micro-batch's loss is 0
    return {**{k: v / max(1, count) for k, v in sums.items()}, "loss": loss, "entropy": ent_sum / max(1, ent_n),
            "update_skipped_fraction": skipped / max(1, len(shard["completion_token_ids"]) * epochs),
            "scored": prep.stats()}


def sft_train(policy, shard: dict, minibatches: int, size: int, pad_id: int, device,
              shared_prefix: bool = True) -> dict:
    """One pass of supervised fine-tuning: token-mean NLL of the responses (prompt tokens masked)."""
    n = len(shard["completion_token_ids"])
    per_mb = n // minibatches
    policy.train()
    total, count = 0.0, 0
    for k in range(minibatches):
        batch = micros(shard, list(range(k * per_mb, (k + 1) * per_mb)), size, pad_id, device, shared_prefix)
        # every response token of the minibatch weighs the same
        denom = accumulation_denom(sum(aggregation_units("token-mean", mb.comp_mask) for mb in batch),
                                   policy.gradient_accumulation_steps(), device)
        for j, mb in enumerate(batch):
            policy.set_gradient_accumulation_boundary(j == len(batch) - 1)
            logp = token_logprobs(completion_logits(policy, mb), mb.comp_ids)
            loss = AGGREGATIONS["token-mean"](-logp, mb.comp_mask, 0, denom)
            policy.backward(loss)
            policy.step()
            total, count = total + loss.item(), count + 1
    return {"loss": total / max(1, count)}
