"""The end-of-run report and the progress display, on hand-written metrics (no run needed)."""

import json

import pytest

from nayer.progress import LineProgress, RoundProgress, progress_bar
from nayer.report import main
from nayer.run_report import round_times, write_report

PIPELINE_ROUNDS = [
    {"epoch": 0, "phase": "warmup", "buffer": 40, "syn_time": 5.0, "commit_time": 0.5, "checkpoint_time": 0.5,
     "syn_ce": 2.0, "elapsed": 6.0},
    {"epoch": 1, "phase": "kd", "buffer": 80, "syn_time": 4.0, "commit_time": 0.5, "kd_phase_time": 10.0,
     "checkpoint_time": 1.5, "syn_ce": 1.0, "syn_agreement": 87.5, "syn_teacher_ce": 0.4, "syn_bn_share": 0.6,
     "kd_loss": 0.3, "top1": 40.0, "per_class": [30.0, 50.0], "elapsed": 22.0},
]


def write_run(folder, records, summary=None, dataset="digits"):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "config.yaml").write_text(f"data:\n  dataset: {dataset}\n  class_names: [cat, dog]\n")
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))


def test_round_time_split_for_both_runners():
    assert round_times(PIPELINE_ROUNDS[1]) == {"synthesis": 4.0, "commit": 0.5, "KD + eval": 10.0, "checkpoint": 1.5}
    single = {"syn_time": 3.0, "kd_time": 7.0, "eval_time": 1.0}  # nayer.run: no commit, KD and eval apart
    assert round_times(single) == {"synthesis": 3.0, "commit": 0.0, "KD + eval": 8.0, "checkpoint": 0.0}


def test_report_of_a_finished_and_of_a_stopped_run(tmp_path):
    done = tmp_path / "done"
    write_run(done, PIPELINE_ROUNDS, {"teacher_top1": 90.0, "stopped_by": None})
    text = write_report(done).read_text()
    assert "| teacher top-1 | 90.00% |" in text and "| student top-1, last round | 40.00% |" in text
    assert "| status | finished |" in text and "| 1 | kd | 40.00 | 87.5 | 0.400 | 0.60 | 0.300 | 4.0 | 0.5 | 10.0 | 1.5 |" in text
    # The report opens with the verdict: the student against the teacher, the teacher's rating, the time split.
    assert text.index("## Verdict") < text.index("## The run") < text.index("## Rounds")
    assert "student top-1 40.00% after round 1 = 44% of the teacher's 90.00%" in text
    assert "the teacher assigns 88% of round 1's kept images to their target class (its CE on them 0.40)" in text
    # 22 s of which synthesis 9 s: the shares are of the summed parts.
    assert "synthesis 9 s (41%), commit 1 s (5%), KD + eval 10 s (45%), checkpoint 2 s (9%)" in text
    assert all((done / "plots" / f"{p}.png").stat().st_size > 0 for p in ("accuracy", "round_time", "per_class"))

    stopped = tmp_path / "stopped"
    write_run(stopped, PIPELINE_ROUNDS[:1], {"teacher_top1": None, "stopped_by": "SIGTERM"})
    text = write_report(stopped).read_text()
    assert "stopped by SIGTERM" in text and "plots/per_class.png" not in text  # no KD round yet: no accuracy


def test_report_cli_names_a_folder_that_is_not_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit, match="is not a run folder"):
        main([str(tmp_path)])


def test_line_progress_prints_plain_lines_only_for_long_phases():
    lines = []
    quiet = LineProgress(10, "round 3 synthesis worker 0", interval=3600, write=lines.append)
    for _ in range(10):
        quiet.update()
    quiet.close()
    assert lines == []  # a short phase stays silent
    chatty = LineProgress(4, "round 3 KD rank 0", interval=0, write=lines.append)
    for _ in range(4):
        chatty.update()
    chatty.close()
    assert len(lines) == 4 and lines[-1].startswith("round 3 KD rank 0: 4/4 steps (100%)")  # the end shown once
    slow = LineProgress(4, "round 4 KD rank 0", interval=0, write=lines.append)
    slow.update(3)
    slow.interval = 3600
    slow.update()
    slow.close()  # the last interval line showed 3/4: the closing line shows the end
    assert [line.split(":")[1].split()[0] for line in lines[4:]] == ["3/4", "4/4"]
    assert not any("\r" in line for line in lines)


def test_round_progress_prints_one_line_per_round_off_a_terminal(capsys):
    progress = RoundProgress("run-1", 0, 2)  # pytest's captured stdout is not a terminal
    progress.round_done({"epoch": 1, "phase": "kd", "top1": 40.0, "syn_agreement": 93.4, "syn_teacher_ce": 0.214,
                         "kd_loss": 0.25, "buffer": 80, "elapsed": 22.0})
    progress.close()
    assert capsys.readouterr().out == ("run-1 round 2/2 [kd] top1=40.00 agree=93% teacher_ce=0.21 kd_loss=0.250 "
                                       "buffer=80 elapsed=22s\n")


def test_a_progress_bar_off_a_terminal_prints_plain_lines_with_its_postfix(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)  # a log file, also under pytest -s
    bar = progress_bar(3, "teacher resnet32", "epoch")
    assert isinstance(bar, LineProgress)
    lines = []
    bar.write, bar.interval = lines.append, 0
    for loss in (2.0, 1.0, 0.5):
        bar.set_postfix(loss=f"{loss:.3f}")
        bar.update()
    bar.close()
    assert lines[0].startswith("teacher resnet32: 1/3 epochs (33%)") and lines[0].endswith(", loss=2.000")
    assert lines[-1].startswith("teacher resnet32: 3/3 epochs (100%)") and not any("\r" in line for line in lines)
