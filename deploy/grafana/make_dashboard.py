"""Writes groupflow.json, the Grafana dashboard (run: python deploy/grafana/make_dashboard.py).

Each panel is a title, a unit and PromQL expressions over groupflow_* metrics; `$run` is a dashboard
variable (the Ray job id of a run). tests/e2e/test_train.py runs every expression against a real
Prometheus that scraped a real run.
"""
import json
from pathlib import Path

R = '{run=~"$run"}'
PANELS = [  # title, unit, [(legend, expr)]
    ("Reward", "none", [("mean", f"groupflow_reward_mean{R}"), ("std", f"groupflow_reward_std{R}")]),
    ("Held-out accuracy", "percentunit", [("pass@1", f"groupflow_eval_pass_at_1{R}")]),
    ("KL and exact divergences", "none", [
        ("kl (in the loss)", f"groupflow_kl{R}"), ("reverse KL", f"groupflow_div_reverse_kl{R}"),
        ("forward KL", f"groupflow_div_forward_kl{R}"), ("JS", f"groupflow_div_js{R}"), ("TV", f"groupflow_div_tv{R}")]),
    ("Entropy", "none", [("entropy", f"groupflow_entropy{R}")]),
    ("Response length", "none", [("tokens", f"groupflow_response_length_mean{R}"),
                                 ("truncated fraction", f"groupflow_truncated_fraction{R}")]),
    ("Generated tokens/s", "none", [("tokens/s", f"groupflow_generated_tokens_per_s{R}")]),
    ("Time per phase", "s", [
        ("generate", f"groupflow_time_generate_s{R}"), ("reward", f"groupflow_time_reward_s{R}"),
        ("pi_old/pi_ref", f"groupflow_time_prepare_s{R}"), ("train (incl. pi_old/pi_ref)", f"groupflow_time_train_s{R}"),
        ("sync", f"groupflow_time_sync_s{R}"), ("step", f"groupflow_time_step_s{R}")]),
    ("Idle fraction per step", "percentunit", [("engines", f"groupflow_engine_idle_fraction{R}"),
                                               ("learner", f"groupflow_learner_idle_fraction{R}")]),
    ("Waiting for the other side", "s", [("learner waited for rollouts", f"groupflow_time_learner_waited_s{R}"),
                                         ("engines waited for weights", f"groupflow_time_engines_waited_s{R}")]),
    ("Policy lag of the batch (async)", "none", [("max", f"groupflow_policy_lag_max{R}"),
                                                 ("mean", f"groupflow_policy_lag_mean{R}")]),
    ("Busy now (live)", "none", [("engines busy", f"sum by (run) (groupflow_engine_busy{R})"),
                                 ("learner ranks busy", f"sum by (run) (groupflow_learner_busy{R})")]),
    ("Samples generated (live)", "none", [("samples/s", f"sum by (run) (rate(groupflow_samples_generated_total{R}[1m]))"),
                                          ("total", f"sum by (run) (groupflow_samples_generated_total{R})")]),
    ("Failures and restarts", "none", [
        ("reward failures (step)", f"groupflow_reward_failures{R}"),
        ("engine restarts", f"groupflow_engine_restarts{R}"), ("run restarts", f"groupflow_restarts{R}")]),
    ("Step and policy version", "none", [("step", f"groupflow_step{R}"), ("policy version", f"groupflow_policy_version{R}")]),
]


def dashboard() -> dict:
    panels = []
    for i, (title, unit, targets) in enumerate(PANELS):
        panels.append({
            "id": i + 1, "type": "timeseries", "title": title, "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(ord("A") + j), "expr": expr, "legendFormat": f"{legend} {{{{run}}}}"}
                        for j, (legend, expr) in enumerate(targets)],
        })
    return {
        "title": "groupflow", "uid": "groupflow", "schemaVersion": 39, "version": 1, "refresh": "10s",
        "time": {"from": "now-6h", "to": "now"}, "tags": ["groupflow", "ray"],
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
            {"name": "run", "type": "query", "label": "run (Ray job)", "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": "label_values(groupflow_step, run)", "includeAll": True, "multi": True, "allValue": ".*",
             "current": {"text": "All", "value": "$__all"}, "refresh": 2},
        ]},
        "panels": panels,
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("groupflow.json")
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {out}")
