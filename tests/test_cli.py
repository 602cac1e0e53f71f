"""One command line for every entry point: --help prints the usage and every key with its default and comment;
every entry point reports a user error, a full disk included, in one line."""

import errno
import subprocess
import sys

import pytest
import torch

from nayer import report, run, train_teacher
from nayer.cli_config import describe_keys, parse_config
from nayer.examples import digits
from nayer.quantize import QuantizeConfig, app as quantize
from nayer.train_teacher import TeacherTrainConfig
from orchestrator import quantize as pipeline_quantize
from orchestrator import run as pipeline_run
from orchestrator import tune
from orchestrator.config import PipelineConfig
from orchestrator.tune import SweepConfig
from helpers import ROOT

ENTRY_POINTS = {"nayer.run": run.main, "nayer.train_teacher": train_teacher.main, "nayer.quantize": quantize.main,
                "nayer.report": report.main, "nayer.examples.digits": digits.main, "orchestrator.run": pipeline_run.main,
                "orchestrator.tune": tune.main, "orchestrator.quantize": pipeline_quantize.main}


@pytest.mark.parametrize("name", ENTRY_POINTS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_usage_and_every_key(name, flag, capsys):
    ENTRY_POINTS[name]([flag])
    out = capsys.readouterr().out
    assert f"python -m {name}" in out  # the usage docstring with its commands
    assert "config keys" in out and " = " in out


def test_help_lists_defaults_and_the_schema_comments(capsys):
    pipeline_run.main(["--help"])
    out = capsys.readouterr().out
    lines = {line.split(" = ")[0].strip(): line for line in out.splitlines() if " = " in line}
    assert set(key for key, _, _ in describe_keys(PipelineConfig)) <= set(lines)
    assert "synthesis.g_steps = 30" in lines["synthesis.g_steps"] and "g: generator steps" in lines["synthesis.g_steps"]
    assert "cluster.synth_workers = 2" in lines["cluster.synth_workers"]
    tune.main(["--help"])
    assert "sweep.scheduler.grace_period = 2" in capsys.readouterr().out


def test_help_as_a_user_types_it():
    done = subprocess.run([sys.executable, "-m", "orchestrator.run", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "python -m orchestrator.run config=" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("schema", [PipelineConfig, QuantizeConfig, TeacherTrainConfig, SweepConfig])
def test_every_key_has_a_comment_unless_its_name_says_it_all(schema):
    plain = {"out_dir", "beta2", "momentum", "weight_decay", "batch_size"}
    missing = [key for key, _, comment in describe_keys(schema) if not comment and key.split(".")[-1] not in plain]
    assert missing == []


def test_train_teacher_reports_a_full_disk_in_one_line(tmp_path, monkeypatch):
    def full(obj, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(torch, "save", full)
    argv = ["arch=resnet20", "dataset=digits", "train=digits:test", "epochs=1", "batch_size=256",
            f"out={tmp_path / 'teacher.pt'}"]
    with pytest.raises(SystemExit) as exit_info:
        train_teacher.main(argv)
    message = str(exit_info.value)
    assert message.startswith(f"error: disk full writing {tmp_path / 'teacher.pt'}") and "\n" not in message
    assert exit_info.value.code == 1  # a failure, not a bad input (2): a requeued SLURM job may try it again
    assert not list(tmp_path.iterdir())  # the temporary file is gone


@pytest.mark.parametrize("given, expected", [
    ("13121_00000", "13121_00000"),  # a Tune trial id, which YAML reads as the integer 1312100000
    ("007", "007"), ("1e5", "1e5"), ("true", "true"), ("", ""),
    ("'007'", "007"), ('"a b"', "a b"), ("it's", "it's"),  # YAML's quotes around the whole value come off
])
def test_a_string_key_takes_its_value_verbatim(given, expected):
    cfg = parse_config(PipelineConfig, [f"name={given}", f"data.eval={given}", "synthesis.g_steps=7"])
    assert (cfg.name, cfg.data.eval, cfg.synthesis.g_steps) == (expected, expected, 7)
    assert parse_config(PipelineConfig, ["lte.pretrained=null"]).lte.pretrained is None


def test_a_bad_input_exits_2_with_its_line_on_stderr(capsys):
    with pytest.raises(SystemExit) as exit_info:
        pipeline_run.main(["synthesis.g_step=3"])
    assert exit_info.value.code == 2 and "did you mean 'synthesis.g_steps'" in str(exit_info.value)
    assert capsys.readouterr().err.strip() == str(exit_info.value)
