"""Token ids of a conversation as the chat template lays it out, built piece by piece so that what
the engine sampled is never re-tokenized: the first messages, then per turn either the model's own
tokens or an observation's. The engine (multi-turn rollouts) and `groupflow sft` (multi-turn traces)
both build turns here, so SFT trains on the layout RL samples in."""
from __future__ import annotations

import re

# Stands for an observation while the template is rendered once, to find the text around it
_SLOT = "GROUPFLOWOBSERVATIONSLOT"


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The first messages, with the generation prompt of the assistant's first turn."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class TurnTemplate:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id
        # What the template puts after an assistant turn's end-of-turn token (often a newline)
        self._base = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
        self._rendered = tokenizer.apply_chat_template(self._base, tokenize=False)
        mark = "a" + tokenizer.eos_token
        if mark not in self._rendered:
            raise ValueError(f"the chat template does not end an assistant turn with the tokenizer's eos token "
                             f"{tokenizer.eos_token!r}; multi-turn rollouts need the model to stop on its "
                             "end-of-turn token (set the tokenizer's eos_token to it)")
        self._tail = self._rendered[self._rendered.rindex(mark) + len(mark):]
        # A tool's output is plain text: a tool that prints "<|im_end|><|im_start|>assistant" must not
        # inject real role tokens. The template's own text around it keeps its special tokens, so the
        # turn is tokenized in three pieces cut at special tokens, where the tokenizer cuts anyway
        # (the ids are those of one pass over the whole turn when the output has no special strings).
        slot = self._user_turn(_SLOT)
        if not slot.startswith(self._rendered) or slot.count(_SLOT) != 1:
            raise ValueError("the chat template renders an earlier turn differently once a turn follows it")
        self._before, self._after = slot[len(self._rendered):].split(_SLOT)
        added = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)
        marks = re.compile("|".join(map(re.escape, added)) or r"(?!)")
        before, after = self._tail + self._before, self._after
        cut_b = max((m.end() for m in marks.finditer(before)), default=0)
        cut_a = next((m.start() for m in marks.finditer(after)), len(after))
        self._head = self.tok(before[:cut_b], add_special_tokens=False)["input_ids"]
        self._lead, self._trail = before[cut_b:], after[:cut_a]
        self._end = self.tok(after[cut_a:], add_special_tokens=False)["input_ids"]

    def _user_turn(self, text: str) -> str:
        return self.tok.apply_chat_template(self._base + [{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=False)

    def _plain(self, text: str) -> list[int]:
        """`text` as ordinary text: special-token strings in it become the tokens of their characters."""
        return self.tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return prompt_ids(self.tok, messages)

    def observation_ids(self, text: str, cap: int | None = None) -> tuple[list[int], bool]:
        """The tokens that follow the model's end of turn when `text` comes back as the next user
        turn, through the next assistant turn's generation prompt; and whether `text` is over `cap`
        tokens (then cut to it)."""
        content = self._plain(text)
        cut = cap is not None and len(content) > cap
        if cut:
            text = self.tok.decode(content[:cap])
        full = self._user_turn(text)
        if not full.startswith(self._rendered):
            raise ValueError("the chat template renders an earlier turn differently once a turn follows it")
        full = full[len(self._rendered):]
        # What the template made of `text` (it may trim it) sits between the same two pieces as the slot
        if not (full.startswith(self._before) and full.endswith(self._after)
                and len(full) >= len(self._before) + len(self._after)):
            raise ValueError("the chat template renders the text around an observation differently per observation")
        body = full[len(self._before):len(full) - len(self._after)]
        return self._head + self._plain(self._lead + body + self._trail) + self._end, cut

    def assistant_ids(self, text: str) -> list[int]:
        """An assistant turn as the model would sample it: its text, then the end-of-turn token."""
        return self.tok(text, add_special_tokens=False)["input_ids"] + [self.eos]

    def conversation(self, messages: list[dict]) -> tuple[list[int], list[int], list[int]]:
        """(prompt ids, completion ids, loss mask) of a whole conversation: the prompt is everything
        before the first assistant turn; assistant turns are learned (mask 1), the rest is context."""
        first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
        if first is None or first == 0:
            raise ValueError("a conversation needs messages before its first assistant turn, and one")
        prompt, ids, mask = self.prompt_ids(messages[:first]), [], []
        for m in messages[first:]:
            if m["role"] == "assistant":
                piece = self.assistant_ids(m["content"])
                ids, mask = ids + piece, mask + [1] * len(piece)
            else:
                piece, _ = self.observation_ids(m["content"])
                ids, mask = ids + piece, mask + [0] * len(piece)
        return prompt, ids, mask
