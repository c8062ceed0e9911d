"""`groupflow eval` / `prune` refuse bad input with exit status 2 before anything starts."""
from cluster.cli import main


def test_eval_without_a_checkpoint_names_the_path(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--checkpoint", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "empty") in err and "config.json" in err


def test_eval_task_that_needs_data_says_so(capsys):
    assert main(["eval", "--checkpoint", "x", "--task", "gsm8k"]) == 2
    err = capsys.readouterr().err
    assert "rewards.task.data_path" in err and "--task gsm8k" in err


def test_prune_rejects_a_missing_model_and_an_empty_band(tmp_path, capsys):
    assert main(["prune", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "model.path" in capsys.readouterr().err
    assert main(["prune", "--model", "smollm2", "--out", str(tmp_path / "o"), "--low", "0.9", "--high", "0.1"]) == 2
    assert "--low" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
