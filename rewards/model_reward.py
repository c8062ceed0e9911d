"""The `model` reward: a HF sequence-classification model in its own actor, scoring (prompt, completion) pairs.

options: path (HF directory), device ("cpu"), label (which logit is the reward, 0), batch_size (8),
max_length (longer pairs lose their start, default: the model's max_position_embeddings),
num_cpus / num_gpus (the actor's resources). A pair is rendered with the tokenizer's chat template as
a user turn and an assistant turn when the tokenizer has one, else as prompt + completion.
"""
from __future__ import annotations

import logging

import ray

log = logging.getLogger("groupflow.rewards")


def render_pair(tokenizer, prompt: str, completion: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
            tokenize=False)
    return prompt + completion


class RewardModel:
    def __init__(self, options: dict):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.device = options.get("device", "cpu")
        self.label = int(options.get("label", 0))
        self.batch_size = int(options.get("batch_size", 8))
        self.tokenizer = AutoTokenizer.from_pretrained(options["path"])
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Right padding keeps every real token's position, so a padded batch scores like single pairs.
        # Left truncation keeps the completion's end, where the classifier reads (the last token).
        self.tokenizer.padding_side, self.tokenizer.truncation_side = "right", "left"
        self.model = AutoModelForSequenceClassification.from_pretrained(
            options["path"], dtype=torch.float32).to(self.device).eval()
        self.max_length = options.get("max_length") or getattr(self.model.config, "max_position_embeddings", None)
        if self.model.config.pad_token_id is None:  # the classifier reads the last non-pad token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if not 0 <= self.label < self.model.config.num_labels:
            raise ValueError(f"model reward: options.label={self.label} but the model has "
                             f"{self.model.config.num_labels} labels")

    def ready(self) -> bool:
        return True

    def score(self, prompts: list[str], completions: list[str]) -> list[float | str]:
        """One logit per pair; a chunk that fails gives its pairs the error text instead (pool: "raised")."""
        out: list[float | str] = []
        for i in range(0, len(prompts), self.batch_size):
            pairs = list(zip(prompts[i:i + self.batch_size], completions[i:i + self.batch_size]))
            try:
                texts = [render_pair(self.tokenizer, p, c) for p, c in pairs]
                enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False,
                                     truncation=self.max_length is not None,
                                     max_length=self.max_length).to(self.device)
                with self.torch.inference_mode():
                    out.extend(self.model(**enc).logits[:, self.label].float().tolist())
            except Exception as e:  # noqa: BLE001 - one bad chunk must not fail the whole batch
                log.warning("model reward: chunk of %d pairs failed: %s: %s", len(pairs), type(e).__name__, e)
                out.extend([f"{type(e).__name__}: {e}"[:500]] * len(pairs))
        return out


RewardModelActor = ray.remote(RewardModel)
