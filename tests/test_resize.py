"""A run resumed on another number of DeepSpeed ranks or synthesis actors (a requeued job on more or fewer nodes).

The ZeRO-1/2 conversion is checked exactly on real DeepSpeed engines (2 gloo processes save, other sizes load and
save again: every parameter's fp32 master weights and SGD momentum come back bit for bit); the pipeline runs
resize 2 -> 1 and 1 -> 2 ranks, 2 -> 1 actors, and are compared with the uninterrupted run.
"""

import contextlib
import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from nayer.cli_config import parse_config
from orchestrator.config import PipelineConfig
from orchestrator.resize import MODEL_STATES, Loadable, NodeRank, load_states, loadable_at, partitioned, to_universal
from orchestrator.run import run
from helpers import free_port, pipeline_args, records


def records_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _engine_worker(rank: int, world: int, stage: int, load: str | None, save: str, port: int) -> None:
    """One DeepSpeed rank: a small net with BatchNorm and the spec's SGD (momentum); trains 3 steps and saves, or
    loads `load` (a universal checkpoint) and saves it again at once."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import deepspeed

    deepspeed.init_distributed("gloo")
    torch.manual_seed(0)
    # 77 parameters: partitions of 39 and 38, the last padded (as DeepSpeed aligns them)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.ReLU(),
                                torch.nn.Linear(7, 3, bias=False))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    config = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8 // world, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**9}
    if load is not None:
        config["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if load is None:
        torch.manual_seed(1 + rank)
        for _ in range(3):
            loss = engine(torch.randn(8 // world, 5)).square().mean()
            engine.backward(loss)
            engine.step()
    else:
        engine.load_checkpoint(load, tag="student")
        saved = load_states(Path(load) / "student" / MODEL_STATES)["module"]
        Loadable(load, config, saved_module=saved).restore_buffers(engine.module)
    engine.save_checkpoint(save, tag="student")
    torch.distributed.destroy_process_group()


def _engines(world: int, stage: int, save: Path, load: Path | None = None) -> None:
    mp.spawn(_engine_worker, args=(world, stage, None if load is None else str(load), str(save), free_port()),
             nprocs=world)


def saved_world_size(tag: Path) -> int:
    return int(load_states(tag / MODEL_STATES)["dp_world_size"])


def _universal_states(tag: Path) -> dict[str, torch.Tensor]:
    return {f"{p.parent.name}/{p.stem}": torch.load(p, weights_only=True)["param"]
            for p in sorted((tag / "zero").glob("*/*.pt"))}


@pytest.mark.slow
def test_a_zero2_checkpoint_of_2_ranks_loads_whole_on_1_and_on_4(tmp_path):
    _engines(2, 2, tmp_path / "saved")
    tag = tmp_path / "saved" / "student"
    assert saved_world_size(tag) == 2 and partitioned(tag)
    universal = to_universal(tag, tmp_path / "universal" / "student")
    before = _universal_states(universal)
    # every parameter's fp32 weights and momentum, whole, in the parameter's shape
    assert sorted(before) == sorted(f"{n}/{s}" for n in ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight")
                                    for s in ("fp32", "momentum_buffer"))
    assert before["0.weight/fp32"].shape == (7, 5) and before["3.weight/momentum_buffer"].abs().sum() > 0
    for world in (1, 4):  # DeepSpeed's universal loader cuts each rank's partition out; saved again, nothing moved
        _engines(world, 2, tmp_path / f"resaved-{world}", load=tmp_path / "universal")
        again = to_universal(tmp_path / f"resaved-{world}" / "student", tmp_path / f"again-{world}" / "student")
        after = _universal_states(again)
        assert saved_world_size(tmp_path / f"resaved-{world}" / "student") == world
        assert after.keys() == before.keys()
        for key, value in before.items():
            assert torch.equal(after[key], value), (world, key)
        # the module too, BatchNorm running statistics included (DeepSpeed's universal load leaves buffers alone)
        modules = [load_states(t / MODEL_STATES)["module"] for t in (tag, again)]
        assert modules[0].keys() == modules[1].keys() and "1.running_var" in modules[0]
        assert all(torch.equal(modules[0][k], modules[1][k]) for k in modules[0]), world


def test_zero0_loads_at_any_size_as_it_is_and_the_same_size_is_left_alone(tmp_path):
    _engines(2, 0, tmp_path / "saved")
    assert not partitioned(tmp_path / "saved" / "student")
    config = {"zero_optimization": {"stage": 0}}
    node = NodeRank(0, lambda: None)
    with contextlib.ExitStack() as scratch:
        loadable = loadable_at(str(tmp_path / "saved"), "saved", 1, config, node, scratch)
        assert (loadable.path, loadable.ds_config) == (str(tmp_path / "saved"), config)
        assert "loads on 1 as it is (ZeRO-0" in loadable.note and loadable.saved_module is None
        assert loadable_at(str(tmp_path / "saved"), "saved", 2, config, node, scratch).note is None
    assert (tmp_path / "saved" / "student" / MODEL_STATES).is_file()


# ---------------------------------------------------------------------------------------------- the pipeline
def _args(tmp_path, ranks: int, actors: int, **extra) -> list[str]:
    return pipeline_args(tmp_path, **{"epochs": 3, "kd.kd_steps": 30, "cluster.schedule": "alternating",
                                      "cluster.trainer_workers": ranks, "cluster.synth_workers": actors, **extra})


def _stop_after_first_kd_round(record: dict) -> None:
    if record["epoch"] == 1:  # as a scheduler's preemption notice: the driver checkpoints round 1 and stops
        os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, local_ray):
    base = tmp_path_factory.mktemp("uninterrupted")
    run(parse_config(PipelineConfig, _args(base, 2, 2, name="ref")))
    return records(base / "runs" / "ref")


@pytest.mark.slow
@pytest.mark.parametrize("before, after, zero", [((2, 2), (1, 1), 0), ((1, 2), (2, 2), 0), ((2, 2), (1, 2), 2)],
                         ids=["2-to-1-ranks-2-to-1-actors", "1-to-2-ranks", "zero2-2-to-1-ranks"])
def test_a_resumed_run_changes_its_size_and_the_student_goes_on(tmp_path, uninterrupted, capfd, before, after, zero):
    """ZeRO-0 loads its checkpoint at the new size as it is; ZeRO-2 through the universal checkpoint. Either way
    rank 0 checks that the student it starts from is the saved one (orchestrator.resize.check_same_student)."""
    deepspeed = {"cluster.deepspeed": f"configs/deepspeed/zero{zero}.json"}
    stopped = run(parse_config(PipelineConfig, _args(tmp_path, *before, **deepspeed)),
                  on_round=_stop_after_first_kd_round)
    assert stopped["stopped_by"] == "SIGTERM" and stopped["rounds_run"] == 2
    capfd.readouterr()
    summary = run(parse_config(PipelineConfig, _args(tmp_path, *after, **deepspeed) + ["resume=true"]))
    console = capfd.readouterr()
    assert summary["rounds_run"] == 4 and summary["trainer_workers"] == after[0]
    assert f"resume: {before[0]} -> {after[0]} DeepSpeed ranks" in console.out
    if before[1] != after[1]:
        assert f"resume: {before[1]} -> {after[1]} synthesis actors: the generator(s) of worker(s) 1-1 are " \
               "dropped" in console.out
    folder = tmp_path / "runs" / "tiny"
    rounds = records(folder)
    assert [r["epoch"] for r in rounds] == [0, 1, 2, 3]
    # the rounds before the stop are the uninterrupted run's where its size was the same
    if before == (2, 2) and zero == 0:
        assert [r["kd_loss"] for r in rounds[1:2]] == [r["kd_loss"] for r in uninterrupted[1:2]]
    # The first resumed round continues the student: its KD loss is near the uninterrupted run's at that round
    # (other batches, another rank split) and far below a fresh student's, the first KD round's (measured:
    # uninterrupted 0.018 at round 2, fresh 0.092 at round 1; resumed 2 -> 1: 0.022, 1 -> 2: 0.020, ZeRO-2: 0.023).
    resumed, reference, fresh = rounds[2]["kd_loss"], uninterrupted[2]["kd_loss"], uninterrupted[1]["kd_loss"]
    assert abs(resumed - reference) < 0.5 * abs(fresh - reference), (resumed, reference, fresh)
    trained = {(r["round"], r["rank"]) for q in range(2) if (folder / "ranks" / f"rank-{q:03d}.jsonl").is_file()
               for r in records_of(folder / "ranks" / f"rank-{q:03d}.jsonl")}
    assert {rank for round_index, rank in trained if round_index >= 2} == set(range(after[0]))
