"""The single-process runner and its strict config: end to end on tiny settings."""

import json

import pytest
import torch

from nayer.cli_config import ConfigError, parse_config
from nayer.config import RunConfig
from nayer.models import build_model
from nayer.run import main, run

from helpers import CONFIGS, run_args as tiny_args


def test_typo_in_override_fails_and_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        parse_config(RunConfig, ["synthesis.g_step=5"])
    msg = str(err.value)
    assert "synthesis.g_step" in msg and "did you mean 'synthesis.g_steps'" in msg and "a_adv" in msg


def test_typo_in_yaml_fails_naming_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kd:\n  temprature: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'kd.temprature' in '.*bad.yaml'.*temperature"):
        parse_config(RunConfig, [f"config={bad}"])


def test_wrong_type_and_bad_choice_fail_clearly():
    with pytest.raises(ConfigError, match="g_steps"):
        parse_config(RunConfig, ["synthesis.g_steps=many"])
    with pytest.raises(ConfigError, match="generator.noisy.mode='k_to_2'.*k_to_1, one_to_one"):
        parse_config(RunConfig, ["generator.noisy.mode=k_to_2"])
    with pytest.raises(ConfigError, match="device='gpu'.*cuda:<index>"):
        parse_config(RunConfig, ["device=gpu"])
    assert parse_config(RunConfig, ["device=cuda:1"]).device == "cuda:1"
    with pytest.raises(ConfigError, match="not key=value"):
        parse_config(RunConfig, ["epochs"])
    with pytest.raises(ConfigError, match="not found"):
        parse_config(RunConfig, ["config=nowhere.yaml"])


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "tiny", "imagenet", "digits", "profiles/cpu"])
def test_shipped_configs_parse(name):
    cfg = parse_config(RunConfig, [f"config={CONFIGS / (name + '.yaml')}"])
    assert cfg.synthesis.g_steps >= 1


def test_paper_values_in_dataset_configs():
    c10 = parse_config(RunConfig, [f"config={CONFIGS / 'cifar10.yaml'}"])
    assert (c10.synthesis.batch_size, c10.synthesis.g_steps, c10.synthesis.g_loops, c10.kd.kd_steps) == (400, 30, 2, 400)
    assert (c10.synthesis.a_bn, c10.synthesis.a_cls, c10.synthesis.a_adv) == (10.0, 0.5, 1.33)
    inet = parse_config(RunConfig, [f"config={CONFIGS / 'imagenet.yaml'}"])
    assert (inet.synthesis.batch_size, inet.synthesis.g_steps, inet.synthesis.g_loops) == (50, 100, 20)


def test_tiny_run_end_to_end_and_resume(tmp_path):
    budget = ["time_budget_s=0.001"]  # stop after the first epoch, as if killed after its checkpoint
    first = run(parse_config(RunConfig, tiny_args(tmp_path) + budget))
    folder = tmp_path / "runs" / "tiny"
    assert first["epochs_run"] == 1
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "summary.json", "samples/epoch-00000.png",
                 "buffer/chunk-000000.pt"):
        assert (folder / name).exists(), name
    assert list((folder / "tb").iterdir())
    with pytest.raises(ConfigError, match="already holds a run"):
        run(parse_config(RunConfig, tiny_args(tmp_path)))
    with pytest.raises(ConfigError, match="config differs"):
        run(parse_config(RunConfig, tiny_args(tmp_path, **{"kd.lr": 0.5}) + budget + ["resume=true"]))
    second = run(parse_config(RunConfig, tiny_args(tmp_path) + budget + ["resume=true"]))
    assert second["epochs_run"] == 2 and second["buffer_images"] == 40
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[0]["phase"] == "warmup" and records[1]["phase"] == "kd"
    assert 0 <= records[1]["top1"] <= 100 and len(records[1]["per_class"]) == 10
    for r in records:  # the whole epoch: synthesis, KD, evaluation; the resumed start's first KD epoch is marked
        assert r["round_time"] >= r["syn_time"] + r.get("kd_time", 0) + r.get("eval_time", 0)
    assert [r["trainer_start"] for r in records] == [False, True]
    student = build_model("resnet20", 10)
    student.load_state_dict(torch.load(folder / "student.pt", weights_only=True))
    report = (folder / "report.md").read_text()
    assert "| status | finished |" in report and "![Accuracy per round](plots/accuracy.png)" in report
    for plot in ("accuracy", "round_time", "per_class"):
        assert (folder / "plots" / f"{plot}.png").stat().st_size > 0


def test_class_count_mismatch_is_named(tmp_path):
    ckpt = tmp_path / "t.pt"
    torch.save(build_model("resnet20", 10).state_dict(), ckpt)
    args = tiny_args(tmp_path, **{"teacher.checkpoint": str(ckpt), "data.class_names": "[a,b,c]", "data.eval": ""})
    with pytest.raises(ConfigError, match="3 class names"):
        run(parse_config(RunConfig, args))


def test_main_prints_one_line_error_and_a_fixed_rerun_works(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(tiny_args(tmp_path, **{"teacher.checkpoint": str(tmp_path / "missing.pt")}))
    assert "missing.pt" in str(exc.value) and str(exc.value).startswith("error:")
    assert not (tmp_path / "runs" / "tiny" / "config.yaml").exists()  # nothing written for a failed start
    assert run(parse_config(RunConfig, tiny_args(tmp_path, epochs=0)))["epochs_run"] == 1


@pytest.mark.parametrize("native", [True, False])
def test_bf16_holds_only_where_the_device_computes_it_natively(monkeypatch, capsys, tmp_path, native):
    """bf16=true on a CPU without AVX512-BF16/AMX (autocast emulated, ~15x slower than fp32) runs in fp32, and the
    run says so in one line; with native bf16 it autocasts and says nothing."""
    import nayer.specs
    from nayer.specs import Compute, bf16_fallback_note

    monkeypatch.setattr(nayer.specs, "native_bf16", lambda device: native)
    assert Compute.select("cpu", bf16=True).bf16 is native
    assert Compute.select("cpu", bf16=False).bf16 is False
    assert (bf16_fallback_note(True, torch.device("cpu")) is None) is native
    run(parse_config(RunConfig, tiny_args(tmp_path, **{"bf16": "true", "epochs": 1, "warmup": 0})))
    noted = "has no native bf16" in capsys.readouterr().out
    assert noted is not native
