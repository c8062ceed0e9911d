"""How a batch of samples is generated: one turn by the engines, or a conversation with an
environment (multiturn.py). The training loop, evaluation and pruning all generate through this."""
from __future__ import annotations

import time

import pyarrow as pa

from actors.group import EngineGroup, Generation
from rewards.config import RolloutConfig

from .multiturn import converse, start_rows


class Generator:
    def __init__(self, engines: EngineGroup, pool, rollout: RolloutConfig, max_model_len: int, timeout_s: float):
        self.engines, self.pool, self.rollout = engines, pool, rollout
        self.max_model_len, self.timeout_s = max_model_len, timeout_s

    def submit(self, rows: list[dict], n: int, greedy: bool = False, first_group: int = 0,
               seed: int | None = None) -> Generation:
        """Start the first turn of n samples per row (returns at once)."""
        if self.rollout.multi_turn:
            rows = start_rows(self.pool, rows)  # the environment's first messages
        return self.engines.submit(rows, n, greedy, first_group, seed)

    def collect(self, gen: Generation) -> pa.Table:
        """The samples of a submitted generation, every turn of them. The table's metadata says when
        the engines began and ended (wall clock: the driver's idle accounting)."""
        table = self.engines.collect(gen, self.timeout_s)
        if not self.rollout.multi_turn:
            return table
        began = table.schema.metadata[b"generate_began"]
        table, _ = converse(self.engines, self.pool, gen.rows, table.replace_schema_metadata(None), self.rollout,
                            self.max_model_len, self.timeout_s, gen.greedy, gen.seed)
        return table.replace_schema_metadata({"generate_began": began, "generate_ended": repr(time.time())})

    def generate(self, rows: list[dict], n: int, greedy: bool = False, first_group: int = 0,
                 seed: int | None = None) -> pa.Table:
        return self.collect(self.submit(rows, n, greedy, first_group, seed))
