"""Files of run folders written by earlier versions (nayer.compat): each carries its format; an older one is read
in the current shape, a newer or damaged one is refused in one line."""

import json

import pytest
import torch

from nayer.compat import FORMAT
from nayer.runtime import save_torch
from orchestrator.messages import ShardEntry
from orchestrator.rounds import SynthesisRound
from orchestrator.shards import Manifest
from orchestrator.state import DriverState


def test_a_driver_checkpoint_carries_its_format_and_reads_back_the_same(tmp_path):
    pending = SynthesisRound(4, {"syn_loss": 1.5, "commit_time": 0.1}, wall=3.0, compute=2.5, bytes=99, excluded=1)
    state = DriverState(synthesized=4, done=3, pending=pending, synth_workers=2, trainer_workers=2)
    assert torch.load(state.save(tmp_path / "driver.pt"), weights_only=True)["format"] == FORMAT
    assert DriverState.load(tmp_path / "driver.pt") == state


def test_a_format_0_driver_checkpoint_loads_with_its_pending_round_in_the_current_shape(tmp_path):
    """Format 0 (before files carried a format) kept a round synthesized ahead of its KD round as its metrics
    record, excluded_shards included, and {} when there was none."""
    fields = {"synthesized": 4, "done": 3, "student_checkpoint": "student-00000/round-00003",
              "best": {"top1": 50.0, "epoch": 3}, "last_top1": 50.0, "elapsed": 12.0, "teacher_top1": 90.0,
              "synth_workers": 2, "trainer_workers": 2}
    record = {"syn_loss": 1.5, "syn_time": 3.0, "syn_compute_time": 2.5, "syn_bytes": 99, "excluded_shards": 1,
              "commit_time": 0.1, "adv_student_round": 2}
    save_torch({**fields, "pending": record}, tmp_path / "v0.pt")
    state = DriverState.load(tmp_path / "v0.pt")
    assert state.pending == SynthesisRound(4, {"syn_loss": 1.5, "commit_time": 0.1, "adv_student_round": 2},
                                           wall=3.0, compute=2.5, bytes=99, excluded=1)
    assert state.best.top1 == 50.0 and state.synth_workers == 2
    assert state.pending.line()["syn_time"] == 3.0 and "excluded_shards" not in state.pending.line()
    save_torch({**fields, "pending": {}}, tmp_path / "v0-none.pt")
    assert DriverState.load(tmp_path / "v0-none.pt").pending is None


def test_a_newer_or_damaged_file_is_refused_naming_it(tmp_path):
    state = DriverState(synthesized=3, done=3)
    saved = torch.load(state.save(tmp_path / "driver.pt"), weights_only=True)
    save_torch({**saved, "format": FORMAT + 1}, tmp_path / "newer.pt")
    with pytest.raises(ValueError, match=f"newer.pt has format {FORMAT + 1}; this code reads formats 0 to {FORMAT}"):
        DriverState.load(tmp_path / "newer.pt")
    save_torch({k: v for k, v in saved.items() if k != "synthesized"}, tmp_path / "damaged.pt")
    with pytest.raises(ValueError, match="is not a DriverState checkpoint of this version"):
        DriverState.load(tmp_path / "damaged.pt")


def test_a_manifest_carries_its_format_and_one_of_format_0_reads_as_it_is(tmp_path):
    entry = ShardEntry("round-00000/worker-000-000000.tar", samples=3, bytes=10, sha256="0" * 64, round=0, seq=0)
    Manifest(tmp_path, [entry]).save()
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["format"] == FORMAT and Manifest.load(tmp_path).shards == [entry]
    (tmp_path / "manifest.json").write_text(json.dumps({k: v for k, v in data.items() if k != "format"}))
    assert Manifest.load(tmp_path).shards == [entry]
    (tmp_path / "manifest.json").write_text(json.dumps({**data, "format": FORMAT + 1}))
    with pytest.raises(ValueError, match=f"manifest.json has format {FORMAT + 1}"):
        Manifest.load(tmp_path)
