"""A reward for mechanics runs of a tiny random model (deploy/configs/smoke.yaml).

A random model almost never states the right answer, so the task's own reward is 0 for every sample
of a run on some CPUs (sampling follows the kernels' last bits), every advantage is 0, and nothing
trains. This one pays for a completion of even length in characters: about half the samples earn it,
whatever the model, so every smoke step has a learning signal.
"""


def even_length(prompt: str, completion: str, metadata: dict) -> float:
    return float(len(completion) % 2 == 0)
