"""The `model` reward: a HF sequence-classification model in its own actor, scoring (prompt, completion) pairs.

options: path (HF directory), device ("cpu"), label (which logit is the reward, 0), batch_size (8),
max_length (truncate longer pairs, default: none), num_cpus / num_gpus (the actor's resources).
A pair is rendered with the tokenizer's chat template as a user turn and an assistant turn when the
tokenizer has one, else as prompt + completion.
"""
from __future__ import annotations

import ray


def render_pair(tokenizer, prompt: str, completion: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
            tokenize=False)
    return prompt + completion


@ray.remote
class RewardModelActor:
    def __init__(self, options: dict):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.device = options.get("device", "cpu")
        self.label = int(options.get("label", 0))
        self.batch_size = int(options.get("batch_size", 8))
        self.max_length = options.get("max_length")
        self.tokenizer = AutoTokenizer.from_pretrained(options["path"])
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Right padding keeps every real token's position, so a padded batch scores like single pairs.
        self.tokenizer.padding_side = "right"
        self.model = AutoModelForSequenceClassification.from_pretrained(
            options["path"], dtype=torch.float32).to(self.device).eval()
        if self.model.config.pad_token_id is None:  # the classifier reads the last non-pad token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if not 0 <= self.label < self.model.config.num_labels:
            raise ValueError(f"model reward: options.label={self.label} but the model has "
                             f"{self.model.config.num_labels} labels")

    def ready(self) -> bool:
        return True

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        texts = [render_pair(self.tokenizer, p, c) for p, c in zip(prompts, completions)]
        out: list[float] = []
        with self.torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                     add_special_tokens=False, truncation=self.max_length is not None,
                                     max_length=self.max_length).to(self.device)
                logits = self.model(**enc).logits
                out.extend(logits[:, self.label].float().tolist())
        return out
