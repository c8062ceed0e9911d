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
    t = sub.add_parser("train", help="run GRPO (or dr_grpo, rloo, ppo) training", description=(
        "Train with GRPO, or the objective algorithm.name picks (grpo, dr_grpo, rloo, ppo; every option: "
        "`groupflow config --describe`, docs/algorithms.md). With no --config, runs the embedded default "
        "(SmolLM2-135M-Instruct on the arithmetic task; deploy/configs/default.yaml writes it out). "
        "KEY=VALUE overrides any field, for example trainer.steps=20 learner.lr=5e-6 "
        "trainer.seed=1. SIGTERM or SIGINT ends a run with a checkpoint (exit status 143 or 130); "
        "`--resume auto` with the same --run-dir continues it."))
    t.add_argument("--config", help="a YAML config (see deploy/configs/)")
    t.add_argument("--resume", metavar="auto|PATH", help="auto: continue from the newest complete checkpoint of "
                   "--run-dir (start afresh if there is none); PATH: continue from that checkpoint")
    t.add_argument("--run-dir", help="where to write metrics, rollouts and checkpoints (default: runs/<time>)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    s = sub.add_parser("sft", help="supervised fine-tuning on prompt/response traces (R1 cold start)",
                       description="Fine-tune the policy on reasoning traces with the GRPO learner's ranks; "
                       "the final checkpoint is a valid model.path for `groupflow train`. See deploy/configs/sft.yaml.")
    s.add_argument("--config", required=True, help="a YAML SFT config (model, data, trainer, learner)")
    s.add_argument("--run-dir")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    c = sub.add_parser("config", help="print the resolved config as YAML (validates it)")
    c.add_argument("--config")
    c.add_argument("--describe", action="store_true", help="list every field with its default and meaning")
    c.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    ev = sub.add_parser("eval", help="pass@1 and pass@k of a checkpoint on a task", description=(
        "Evaluate a HF checkpoint with the vLLM engines and the configured reward (the task's scorer "
        "by default). --samples 1 decodes greedily; K > 1 samples at engines.temperature and reports "
        "pass@1 (mean success rate) and unbiased pass@K. A sample is solved when its reward reaches 1."))
    ev.add_argument("--checkpoint", required=True, help="a HF checkpoint dir (config.json), e.g. RUN/checkpoints/final")
    ev.add_argument("--config", help="a YAML config for engines and rewards (default: the embedded one)")
    ev.add_argument("--task", help="sets rewards.task.name (gsm8k and dataset also need rewards.task.data_path=...)")
    ev.add_argument("--split", choices=("eval", "train"), default="eval",
                    help="eval: the held-out prompts; train: the first rewards.task.eval_size training rows")
    ev.add_argument("--samples", type=_positive, default=1, help="K completions per prompt (default 1: greedy)")
    ev.add_argument("--json", help="also write the report here")
    ev.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    pr = sub.add_parser("prune", help="pass rate per training prompt; keep the prompts inside a band",
                        description=("Sample K completions per training prompt with a model, write each "
                                     "prompt's pass rate to OUT/pass_rates.parquet and the prompts with "
                                     "LOW < pass rate < HIGH to OUT/kept.jsonl (in the task's own fields), "
                                     "and a report to OUT/report.json."))
    pr.add_argument("--config", help="a YAML config: the task, engines and rewards (default: the embedded one)")
    pr.add_argument("--model", required=True, help="'smollm2' or a HF checkpoint dir")
    pr.add_argument("--samples", type=_positive, default=8, help="K completions per prompt")
    pr.add_argument("--low", type=float, default=0.0, help="keep pass rates above this (default 0: drop never solved)")
    pr.add_argument("--high", type=float, default=1.0, help="keep pass rates below this (default 1: drop always solved)")
    pr.add_argument("--inclusive-low", action="store_true", help="also keep pass rate == LOW")
    pr.add_argument("--inclusive-high", action="store_true", help="also keep pass rate == HIGH")
    pr.add_argument("--limit", type=_positive, help="only the first N training prompts (default: all)")
    pr.add_argument("--chunk", type=_positive, default=64, help="prompts sent to the engines at a time")
    pr.add_argument("--out", required=True, help="output directory")
    pr.add_argument("--no-progress", action="store_true")
    pr.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    rp = sub.add_parser("report", help="one self-contained HTML page with plots of one run or several",
                        description="Plots of reward, held-out accuracy, KL and divergences, entropy, response "
                        "length, truncation, throughput, failures and the time per phase; several run "
                        "directories overlay their curves. Opens in any browser, offline.")
    rp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rp.add_argument("--out", help="the HTML file (default: RUN_DIR/report.html of the first run)")
    tr = sub.add_parser("traces", help="tool-use conversations for `groupflow sft` (data.messages_field: messages)",
                        description="Writes COUNT jsonl conversations from the configured task's training prompts: "
                        "the environment's first messages, a correct tool call, its result, the answer.")
    tr.add_argument("--config")
    tr.add_argument("--count", type=_positive, default=1000)
    tr.add_argument("--out", required=True, help="the jsonl file to write")
    tr.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    ch = sub.add_parser("chaos", help="a run under seeded faults against the same run clean: exactly once, measured",
                        description="Run the config clean, then again under a seeded schedule of real faults (SIGKILL "
                        "of an engine generating, idle or receiving a push, of a learner rank scoring or training, of "
                        "a reward worker; SIGTERM of the driver, then --resume auto), and report each fault's phase, "
                        "recovery path and time, and how far the final weights, metrics and rollouts differ "
                        "(RUN_DIR/clean, RUN_DIR/chaos).")
    ch.add_argument("--config")
    ch.add_argument("--run-dir")
    ch.add_argument("--faults", type=_positive, default=10, help="how many, at seeded random steps and kinds")
    ch.add_argument("--seed", type=int, default=0, help="the schedule's seed")
    ch.add_argument("--schedule", help="instead: STEP:KIND,... injected in order once STEP is logged")
    ch.add_argument("--clean", help="compare against this finished run of the same config instead of running it")
    ch.add_argument("--json", help="also write the report here")
    ch.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    b = sub.add_parser("bench", help="benchmarks with JSON output")
    bsub = b.add_subparsers(dest="bench", required=True)
    bt = bsub.add_parser("train", help="run a training and report wall time, accuracy and phase shares")
    bt.add_argument("--config")
    bt.add_argument("--run-dir")
    bt.add_argument("--json", help="also write the report here")
    bt.add_argument("--mode", choices=("sync", "async"), help="async: train the config synchronously, then "
                    "asynchronously, and compare (RUN_DIR/sync, RUN_DIR/async)")
    bt.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    bm = bsub.add_parser("memory", help="peak learner memory of PPO (with its critic) vs GRPO on one batch")
    bm.add_argument("--config")
    bm.add_argument("--run-dir")
    bm.add_argument("--steps", type=int, default=3, help="training steps per algorithm")
    bm.add_argument("--json", help="also write the report here")
    bm.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    bl = bsub.add_parser("learn", help="held-out accuracy against training time, per variant and seed")
    bl.add_argument("--config")
    bl.add_argument("--run-dir")
    bl.add_argument("--variants", help="NAME:KEY=VALUE ...;NAME:... (default: the precision policies)")
    bl.add_argument("--seeds", default="0,1", help="comma-separated trainer.seed values")
    bl.add_argument("--json", help="also write the report here")
    bl.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    for name, helptext, count, default, what in (
            ("learner", "learner tokens/s with each optimization on and off, and FLOP/s against a plain "
             "matrix product", "--steps", 3, "steps per variant; the first is a warm-up"),
            ("rollout", "tokens/s of groupflow's rollout actors against a standalone vLLM engine",
             "--rounds", 3, "timed generation rounds of each"),
            ("sync", "groupflow's weight push against a raw broadcast of the same bytes, and a bucket-size "
             "sweep", "--repeats", 5, "timed pushes of each")):
        sp = bsub.add_parser(name, help=helptext)
        sp.add_argument("--config")
        sp.add_argument("--run-dir")
        sp.add_argument(count, dest="count", type=_positive, default=default, help=what)
        sp.add_argument("--json", help="also write the report here")
        if name == "learner":
            sp.add_argument("--variants", help="comma-separated subset; ratios are against the first "
                            "(default: all, baseline first)")
        sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    return p


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _overrides(args) -> list[str]:
    """The flags that are config fields, as overrides placed before the user's own."""
    if args.command == "eval" and args.task:
        return [f"rewards.task.name={args.task}", *args.overrides]
    if args.command == "prune":  # the model given is the model measured: no random re-init from the config
        return [f"model.path={args.model}", "model.random_init=null", *args.overrides]
    if args.command == "train" and args.resume:
        return [f"trainer.resume_from={args.resume}", *args.overrides]
    return list(args.overrides)


def _chaos(args, cfg) -> int:
    from . import chaos
    try:
        faults = chaos.parse_schedule(args.schedule) if args.schedule else \
            chaos.schedule(args.faults, cfg.trainer.steps, args.seed)
    except ValueError as e:
        print(f"groupflow: {e}", file=sys.stderr)
        return 2
    report = chaos.chaos(args.config, list(args.overrides), _run_dir(args.run_dir), faults, args.seed,
                         Path(args.clean) if args.clean else None)
    text = json.dumps(report, indent=2)
    print(text)
    print(chaos.table(report))
    if args.json:
        Path(args.json).write_text(text)
    return 0


def _run_dir(arg: str | None) -> Path:
    return Path(arg) if arg else Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def _env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a model hub at run time
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # KEY=VALUE overrides may come before or after flags (`train a=1 --resume auto b=2`)
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.command == "report":
        from .report import write_report
        try:
            print(f"groupflow: report written to {write_report(args.run_dirs, args.out)}")
        except FileNotFoundError as e:
            print(f"groupflow: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        if args.command == "sft":
            from .sft import SFTConfig
            cfg = load_config(args.config, args.overrides, SFTConfig)
        else:
            cfg = load_config(args.config, _overrides(args))
    except ConfigError as e:
        hint = ""
        if getattr(args, "task", None) in ("gsm8k", "dataset") and "data_path" in str(e):
            hint = f"\n  --task {args.task} reads its prompts from a file: add rewards.task.data_path=PATH"
        print(f"groupflow: {e}{hint}", file=sys.stderr)
        return 2
    if args.command == "config":
        from .config import describe, dump_config
        print("\n".join(describe()) if args.describe else dump_config(cfg).rstrip())
        return 0
    _env()
    if args.command == "traces":
        from rewards.tasks import make_task
        from rewards.traces import write_traces
        n = write_traces(make_task(cfg.rewards.task, cfg.trainer.seed), cfg.rollout.env, args.count, Path(args.out))
        print(f"groupflow: {n} {cfg.rollout.env} traces written to {args.out}")
        return 0
    if args.command in ("eval", "prune"):
        return _eval_or_prune(args, cfg)
    if args.command == "chaos":
        return _chaos(args, cfg)
    from actors.group import EngineFailure

    from .checkpoint import CheckpointError
    from .loop import train
    from .preemption import Preempted

    if getattr(args, "resume", None) == "auto" and not args.run_dir:
        print("groupflow: --resume auto continues a run directory: give it with --run-dir", file=sys.stderr)
        return 2
    run_dir = _run_dir(args.run_dir)
    print(f"groupflow: run directory {run_dir.resolve()}", flush=True)
    if args.command in ("train", "sft"):
        if args.command == "sft":
            from .sft import sft as train
        try:
            summary = train(cfg, run_dir, progress=not args.no_progress)
        except ConfigError as e:  # found only when the run starts (e.g. a resume on other data)
            print(f"groupflow: {e}", file=sys.stderr)
            return 2
        except (CheckpointError, EngineFailure, TimeoutError) as e:
            print(f"groupflow: {e}", file=sys.stderr)
            return 1
        except Preempted as p:
            print(f"groupflow: {p}", file=sys.stderr)
            return 128 + p.signum
        print(json.dumps(summary, indent=2))
        return 0
    from . import bench
    if args.bench == "learn":
        from . import bench_learn
        variants = bench_learn.parse_variants(args.variants or bench_learn.PRECISION_VARIANTS)
        report = bench_learn.learn_report(cfg, run_dir, variants, [int(s) for s in args.seeds.split(",")])
    elif args.bench == "train" and args.mode == "async":
        report = bench.async_report(cfg, run_dir)
    elif args.bench == "train":
        report = bench.train_report(cfg.model_copy(update={"trainer": cfg.trainer.model_copy(
            update={"mode": args.mode})}) if args.mode else cfg, run_dir)
    else:
        import ray

        from .bench_engines import rollout_report, sync_report
        from .bench_learner import learner_report
        run = {"memory": bench.memory_report, "learner": learner_report, "rollout": rollout_report,
               "sync": sync_report}[args.bench]
        extra = {"variants": args.variants.split(",")} if getattr(args, "variants", None) else {}
        try:
            report = run(cfg, run_dir, args.steps if args.bench == "memory" else args.count, **extra)
        finally:
            ray.shutdown()
    text = json.dumps(report, indent=2)
    print(text)
    if args.bench == "learn":
        from .bench_learn import table
        print(table(report))
    elif args.bench == "learner":
        print(_learner_table(report))
    elif args.bench == "train" and args.mode == "async":
        print(_async_table(report))
    elif args.bench in ("rollout", "sync"):
        print(_ratio_table(args.bench, report))
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def _async_table(report: dict) -> str:
    rows = [("step (median of steps 2..)", "step_s_median"), ("generation + scoring", "generation_s_median"),
            ("pi_old/pi_ref + update + sync", "training_s_median"), ("learner waited", "learner_waited_s_median"),
            ("engines waited", "engines_waited_s_median"), ("wall time", "wall_time_s")]
    lines = [f"{'seconds':32} {'sync':>8} {'async':>8}"]
    for label, key in rows:
        cells = [report["runs"][m].get(key) for m in ("sync", "async")]
        lines.append(f"{label:32} " + " ".join(f"{c:8.1f}" if c is not None else f"{'-':>8}" for c in cells))
    lines.append(f"async step / max(generation, training) of the async run: {report['async_step_over_max_side']:.2f} "
                 f"(of the sync run: {report['async_step_over_sync_max_side']:.2f}); speedup over sync: "
                 f"{report['speedup_over_sync']:.2f}x")
    return "\n".join(lines)


def _learner_table(report: dict) -> str:
    lines = [f"{'variant':48} {'prepare tok/s':>13} {'update tok/s':>12} {'learner tok/s':>13} {'speedup':>7} "
             f"{'skipped':>7} {'step-1 diff':>11}"]
    for name, r in report["variants"].items():
        lines.append(f"{name:48} {r['prepare_tokens_per_s']:13.0f} {r['update_tokens_per_s']:12.0f} "
                     f"{r['learner_tokens_per_s']:13.0f} {r['speedup']:7.2f} {r['update_skipped_fraction']:7.2f} "
                     + (f"{r['step1_max_abs_diff']:11.2e}" if r["step1_max_abs_diff"] is not None else f"{'-':>11}"))
    f = report["baseline_fraction_of_matmul"]
    if f:
        lines.append(f"baseline FLOP/s as a fraction of a {report['learner']['dtype']} matmul "
                     f"({report['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s): prepare {f['prepare']:.2f}, "
                     f"update {f['update']:.2f}")
    return "\n".join(lines)


def _ratio_table(which: str, r: dict) -> str:
    if which == "rollout":
        return (f"{'standalone vLLM tok/s':>22} {'groupflow tok/s':>16} {'ratio':>6}\n"
                f"{r['standalone_tokens_per_s']:22.1f} {r['groupflow_tokens_per_s']:16.1f} {r['ratio']:6.3f}")
    lines = [f"{'raw broadcast s':>16} {'groupflow push s':>17} {'ratio':>6}",
             f"{r['raw_broadcast_s_median']:16.3f} {r['push_s_median']:17.3f} {r['ratio']:6.3f}",
             f"{'bucket MiB':>10} {'buckets':>8} {'push s':>8}"]
    lines += [f"{mb:>10} {v['buckets']:8d} {v['push_s_median']:8.3f}" for mb, v in r["bucket_sweep"].items()]
    return "\n".join(lines)


def _eval_or_prune(args, cfg: Config) -> int:
    if args.command == "eval":
        ckpt = Path(args.checkpoint)
        if not (ckpt / "config.json").is_file():
            print(f"groupflow: --checkpoint {ckpt}: not a HF checkpoint directory (no config.json)", file=sys.stderr)
            return 2
        from .evaluate import evaluate_checkpoint
        report = evaluate_checkpoint(cfg, str(ckpt), args.split, args.samples)
    else:
        if not 0.0 <= args.low <= args.high <= 1.0:
            print(f"groupflow: the band needs 0 <= --low <= --high <= 1, got {args.low}, {args.high}", file=sys.stderr)
            return 2
        from .prepare import prepare_model
        from .prune import prune
        out = Path(args.out)
        model = prepare_model(cfg.model, out, cfg.trainer.seed)  # smollm2: the converted checkpoint
        report = prune(cfg, str(model), out, args.samples, args.low, args.high, args.limit,
                       args.inclusive_low, args.inclusive_high, args.chunk, progress=not args.no_progress)
    text = json.dumps(report, indent=2)
    print(text)
    if getattr(args, "json", None):
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
