"""Ray Tune sweeps: the sweep file is strict; a real 3-trial sweep over cluster.synth_workers of tiny pipeline runs
(local Ray, Ray Train, DeepSpeed) starts each trial when its own needs fit and writes the results table, the plot
and each trial's run folder; a trial Tune restarts resumes its run and reports the KD round it resumed at."""

import csv
import json
from pathlib import Path

import pytest

from nayer.cli_config import ConfigError
from orchestrator.tune import parse_sweep, sweep_main
from helpers import pipeline_args as tiny_args, records


def write_sweep(tmp_path, text):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return f"sweep={path}"


@pytest.mark.parametrize("text, message", [
    ("space: {synthesis.g_steps: {grid: [1, 2]}}\nschedular: {type: asha}\n", "unknown config key 'schedular'"),
    ("space: {synthesis.g_step: {grid: [1, 2]}}\n", "did you mean 'synthesis.g_steps'"),
    ("space: {synthesis.g_steps: {range: [1, 2]}}\n", "must be one of {grid: ...}"),
    ("space: {synthesis.a_adv: {uniform: [0.5]}}\n", "needs \\[low, high\\]"),
    ("space: {}\n", "space` is empty"),
    ("space: {name: {grid: [a, b]}}\n", "set by the sweep itself"),
    ("metric: top5\nspace: {synthesis.g_steps: {grid: [1]}}\n", "choose one of: top1, kd_loss"),
    ("scheduler: {type: hyperband}\nspace: {synthesis.g_steps: {grid: [1]}}\n", "choose asha or fifo"),
])
def test_bad_sweep_files_name_the_problem(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        parse_sweep([write_sweep(tmp_path, text), *tiny_args(tmp_path)])


def test_sweep_needs_a_file_and_an_eval_set_for_top1(tmp_path):
    with pytest.raises(ConfigError, match="no sweep file"):
        parse_sweep(tiny_args(tmp_path))
    sweep = write_sweep(tmp_path, "space: {synthesis.g_steps: {grid: [1]}}\n")
    with pytest.raises(ConfigError, match="needs a labeled test set"):
        parse_sweep([sweep, *tiny_args(tmp_path), "data.eval="])
    with pytest.raises(ConfigError, match="unknown config key 'cluster.synth_worker'"):
        parse_sweep([sweep, *tiny_args(tmp_path), "cluster.synth_worker=1"])
    s, base, _ = parse_sweep([sweep, *tiny_args(tmp_path), "sweep.scheduler.grace_period=3"])
    assert s.scheduler.grace_period == 3 and base.synthesis.g_steps == 2


def span(run: Path) -> tuple[float, float]:
    """When a trial's run ran: its config.yaml (written at the start) to its last metrics line."""
    return (run / "config.yaml").stat().st_mtime, (run / "metrics.jsonl").stat().st_mtime


def test_sweep_over_synth_workers_starts_each_trial_when_its_own_needs_fit(tmp_path, local_ray):
    # The session's Ray has 4 CPUs. A trial holds its driver (1 CPU), its actors and its rank (0.5 CPU each):
    # 2 CPUs with one actor, 2.5 with two. So the two 1-actor trials run together, and the 2-actor trial waits
    # until both have ended (2 + 2.5 > 4), although Tune alone would start it beside one of them (its placement
    # group holds the driver and the actors, not the rank).
    sweep = write_sweep(tmp_path, "space: {cluster.synth_workers: {grid: [1, 1, 2]}}\nscheduler: {grace_period: 1}\n")
    args = [sweep, *tiny_args(tmp_path, **{"name": "sw", "cluster.trainer_workers": 1, "cluster.synth_cpus": 0.5,
                                           "cluster.trainer_cpus": 0.5})]
    rows = sweep_main(args)
    folder = tmp_path / "runs" / "sw"
    assert [r["cluster.synth_workers"] for r in rows] == [1, 1, 2]
    with open(folder / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["trial"] for t in table] == [r["trial"] for r in rows]
    assert (folder / "accuracy_vs_time.png").stat().st_size > 0 and (folder / "results.md").is_file()
    for r in rows:
        # Tune saw one report per KD round; a trial either ran all 2 or ASHA cut it at its grace period of 1.
        assert r["status"] in ("completed", "stopped early by ASHA") and len(r["history"]) == r["kd_rounds"]
        assert r["kd_rounds"] == (2 if r["status"] == "completed" else 1)
        run = folder / r["trial"]
        assert (run / "metrics.jsonl").is_file() and (run / "checkpoints" / "driver.pt").is_file()
        if r["status"] == "completed":
            assert (run / "summary.json").is_file() and (run / "report.md").is_file()
    (a_start, a_end), (b_start, b_end), (c_start, _) = (span(folder / r["trial"]) for r in rows)
    assert max(a_start, b_start) < min(a_end, b_end), "the two 1-actor trials fit together but did not overlap"
    assert c_start > max(a_end, b_end), "the 2-actor trial started beside a trial it does not fit next to"
    with pytest.raises(ConfigError, match="already holds a sweep"):
        sweep_main(args)


@pytest.mark.slow
def test_a_restarted_trial_reports_the_kd_round_its_run_resumed_at(tmp_path, local_ray, monkeypatch):
    # The trial's driver is killed once KD round 1 is checkpointed and reported; Tune restarts the trial, which
    # resumes its run at KD round 2. Tune's training_iteration starts at 1 again; kd_round, ASHA's time
    # attribute, says 2, so ASHA compares the trial with the others at the round it really is in.
    monkeypatch.setenv("NAYER_FAULTS", "kill_driver:round=1")  # round 0: warm-up, round 1: the first KD round
    sweep = write_sweep(tmp_path, "space: {synthesis.g_steps: {grid: [2]}}\nmax_failures: 1\n"
                                  "scheduler: {grace_period: 2}\n")
    rows = sweep_main([sweep, *tiny_args(tmp_path, **{"name": "rs", "cluster.synth_workers": 1,
                                                     "cluster.trainer_workers": 1})])
    [row] = rows
    run = tmp_path / "runs" / "rs" / row["trial"]
    assert row["status"] == "completed" and row["kd_rounds"] == 2, row
    assert (run / "faults" / "0-kill_driver.fired").is_file()
    reports = [json.loads(line) for line in (run / "result.json").read_text().splitlines()]
    assert [(r["training_iteration"], r["kd_round"]) for r in reports][-1] == (1, 2)
    assert [r["epoch"] for r in records(run)] == [0, 1, 2]  # resumed after round 1, not started again


@pytest.mark.parametrize("sweep", ["digits_g_adv", "cifar10_g"])
def test_shipped_sweep_files_parse(sweep):
    configs = Path(__file__).resolve().parents[1] / "configs"
    s, base, _ = parse_sweep([f"sweep={configs / 'sweeps' / (sweep + '.yaml')}",
                              f"config={configs / 'digits.yaml'},{configs / 'profiles' / 'cpu_sweep.yaml'}"])
    assert "synthesis.g_steps" in s.space and base.cluster.synth_workers == 1
    if sweep == "cifar10_g":  # supplementary Table 6: g from 2 to 50, the paper's 30 among them
        assert s.space["synthesis.g_steps"]["grid"] == [2, 5, 10, 20, 30, 50]
