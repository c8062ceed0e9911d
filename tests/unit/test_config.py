"""Config errors stop before any actor starts, name the key or path, and exit with status 2."""
import subprocess
import sys

import pytest
import yaml

from cluster.cli import main
from cluster.config import Config, ConfigError, load_config
from tests.conftest import GSM8K, ROOT


@pytest.mark.parametrize("override, named", [
    (["trainer.stepz=3"], "trainer.stepz: unknown key"),
    (["trainer.steps=abc"], "trainer.steps"),
    (["learner.lr=-1"], "learner.lr"),
    (["rewards.task.name=gsm8k", "rewards.task.data_path=/no/such/train.jsonl"], "/no/such/train.jsonl"),
    (["rewards.task.name=gsm8k"], "rewards.task.data_path"),
    (["model.path=/no/such/model"], "/no/such/model"),
    (["trainer.prompts_per_step=3", "trainer.group_size=3"], "learner.num_ranks * learner.minibatches"),
    (["trainer"], "KEY=VALUE"),
])
def test_bad_config_names_the_key(override, named, capsys):
    assert main(["train", *override]) == 2
    err = capsys.readouterr()
    assert named in err.err
    assert "run directory" not in err.out  # stopped before anything started


def test_missing_config_file_and_bad_yaml(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [1, 2\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "bad.yaml" in capsys.readouterr().err


def test_console_script_exits_2():
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "train", "engines.dtype=float8"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "engines.dtype" in proc.stderr


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["trainer.steps=7", "learner.lr=2e-6", "sync.enabled=false",
                             f"rewards.task.data_path={GSM8K}", "rewards.task.name=gsm8k"])
    assert cfg.trainer.steps == 7 and cfg.learner.lr == 2e-6 and cfg.sync.enabled is False
    assert cfg.rewards.task.name == "gsm8k"


def test_deploy_default_yaml_is_the_embedded_default():
    written = yaml.safe_load((ROOT / "deploy/configs/default.yaml").read_text())
    assert Config.model_validate(written) == Config()


@pytest.mark.parametrize("name", ["default.yaml", "smoke.yaml", "gpu-1.5b-8gpu.yaml", "gpu-1.5b-8gpu-async.yaml",
                                  "gsm8k-cpu.yaml", "async-cpu.yaml", "smoke-tools.yaml", "tools-calculator.yaml"])
def test_shipped_configs_validate(name, monkeypatch):
    monkeypatch.chdir(ROOT)  # gsm8k-cpu.yaml reads deploy/data relative to the checkout
    path = ROOT / "deploy/configs" / name
    if name.startswith("gpu"):
        # It names a checkpoint that exists on the cluster, not here: validate everything else.
        tree = yaml.safe_load(path.read_text())
        tree["model"]["path"] = "smollm2"
        tree["rewards"]["task"]["data_path"] = str(GSM8K)
        cfg = Config.model_validate(tree)
        assert cfg.sync_backend == "nccl" and cfg.engines.device == "cuda"
    else:
        load_config(path)


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learner:\n  zero_stag: 3\n")
    with pytest.raises(ConfigError, match="learner.zero_stag: unknown key"):
        load_config(f)


def test_config_reference_documents_every_algorithm_option(capsys):
    from cluster.config import describe
    from learner.config import AlgorithmConfig
    undocumented = [line for line in describe(AlgorithmConfig, "algorithm.") if "  # " not in line]
    assert not undocumented
    assert main(["config", "--describe"]) == 0
    out = capsys.readouterr().out
    assert "algorithm.loss_aggregation = None  # GRPO paper / DAPO / Dr.GRPO" in out
    assert "algorithm.ppo.lam = 0.95  # ppo: lambda of GAE" in out
    assert "trainer.steps = 12" in out


def test_process_supervision_needs_a_step_reward():
    with pytest.raises(ConfigError, match="supervision=process needs a reward"):
        load_config(None, ["algorithm.supervision=process"])
    cfg = load_config(None, ["algorithm.supervision=process",
                             "rewards.components=[{name: python, options: {function: deploy/rewards/steps.py:line_steps}}]"])
    assert cfg.rewards.components[0].options["function"].startswith("/")  # resolved for the workers


def test_sft_batch_must_split_into_micro_batches(tmp_path):
    from cluster.sft import SFTConfig
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    cfg = load_config(None, [f"data.path={data}", "learner.lr=1e-4"], SFTConfig)
    assert cfg.learner.minibatches == 1  # a partial learner section keeps SFT's one step per batch
    with pytest.raises(ConfigError, match="micro_batch_size=16 must divide the 24"):
        load_config(None, [f"data.path={data}", "trainer.batch_size=24"], SFTConfig)


def test_shipped_sft_config_validates():
    from cluster.sft import SFTConfig
    cfg = load_config(ROOT / "deploy/configs/sft.yaml", [], SFTConfig)
    assert cfg.data.prompt_field == "question" and cfg.learner.minibatches == 1


def test_algorithm_shorthand():
    assert load_config(None, ["algorithm=ppo"]).algorithm.name == "ppo"
    assert load_config(None, ["algorithm=dr_grpo"]).algorithm.aggregation == "seq-mean-token-sum-norm"
    with pytest.raises(ConfigError, match="algorithm.name"):
        load_config(None, ["algorithm=dpo"])
