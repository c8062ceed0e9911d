"""groupflow: the command line. `groupflow train` with no arguments runs the embedded default."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from .config import ConfigError, Config, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="groupflow", description="GRPO on Ray: vLLM rollouts, reward "
                                "workers, a DeepSpeed ZeRO-3 learner, NCCL/gloo weight sync.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run GRPO training", description=(
        "Train with GRPO. With no --config, runs the embedded default (SmolLM2-135M-Instruct on the "
        "arithmetic task; deploy/configs/default.yaml writes it out). KEY=VALUE overrides any field, "
        "for example trainer.steps=20 learner.lr=5e-6."))
    t.add_argument("--config", help="a YAML config (see deploy/configs/)")
    t.add_argument("--run-dir", help="where to write metrics, rollouts and checkpoints (default: runs/<time>)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    c = sub.add_parser("config", help="print the resolved config as YAML (validates it)")
    c.add_argument("--config")
    c.add_argument("--describe", action="store_true", help="list every field with its default and meaning")
    c.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    b = sub.add_parser("bench", help="benchmarks with JSON output")
    bsub = b.add_subparsers(dest="bench", required=True)
    bt = bsub.add_parser("train", help="run a training and report wall time, accuracy and phase shares")
    bt.add_argument("--config")
    bt.add_argument("--run-dir")
    bt.add_argument("--json", help="also write the report here")
    bt.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    return p


def _run_dir(arg: str | None) -> Path:
    return Path(arg) if arg else Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def _env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a model hub at run time
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg: Config = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"groupflow: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        from .config import describe, dump_config
        print("\n".join(describe()) if args.describe else dump_config(cfg).rstrip())
        return 0
    _env()
    from .loop import train

    run_dir = _run_dir(args.run_dir)
    print(f"groupflow: run directory {run_dir.resolve()}", flush=True)
    if args.command == "train":
        summary = train(cfg, run_dir, progress=not args.no_progress)
        print(json.dumps(summary, indent=2))
        return 0
    from .bench import train_report
    report = train_report(cfg, run_dir)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
