"""Resuming the DeepSpeed ranks at another world size (`cluster.trainer_workers` changed on resume).

What carries the student and its optimizer state depends on the ZeRO stage (DeepSpeed 0.19.8):
- ZeRO-0 (`configs/deepspeed/zero0.json`, the default) keeps the whole optimizer state, SGD momentum included, in
  `mp_rank_00_model_states.pt`; `engine.load_checkpoint` reads it at any data-parallel size as it is.
- ZeRO-1/2 save one optimizer partition per rank (`zero_pp_rank_Q_mp_rank_00_optim_states.pt`), and
  `load_checkpoint` refuses another data-parallel size ("Automatic adjustment of ZeRO's optimizer state
  partitioning with a new world size is not currently supported"). DeepSpeed's mechanism for a new size is its
  *universal checkpoint*: every parameter's fp32 master weights and optimizer state whole, one folder per
  parameter (`<tag>/zero/<name>/<state>.pt`), loaded with `"checkpoint": {"load_universal": true}`, which cuts
  each rank's partition out of them. Its converter, `deepspeed.checkpoint.ds_to_universal`, knows Adam's state
  only (it reads `exp_avg` and `exp_avg_sq`); the student's optimizer is the spec's SGD (`momentum_buffer`). So
  `to_universal` below writes that format for any per-element optimizer state, the way ds_to_universal merges
  partitions without tensor or pipeline parallelism: a parameter's fragments concatenated in data-parallel
  order. DeepSpeed's own universal loader then loads it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from nayer.runtime import RunError

TAG = "student"  # the DeepSpeed checkpoint tag in each of the ranks' checkpoint folders
MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"
# deepspeed.checkpoint.constants (spelled out: the driver imports this module, and deepspeed only on the ranks)
OPTIMIZER_STATE_DICT, BASE_OPTIMIZER_STATE, PARAM_GROUPS = "optimizer_state_dict", "base_optimizer_state", "param_groups"
FP32_GROUPS, SLICE_MAPPINGS, PARAM = "single_partition_of_fp32_groups", "param_slice_mappings", "param"
SHARDED = (BASE_OPTIMIZER_STATE, SLICE_MAPPINGS, FP32_GROUPS)


def load_states(path: str | Path) -> dict:
    """A file of a DeepSpeed checkpoint, unpickling tensors, containers and the three DeepSpeed classes its ZeRO
    optimizer state holds, nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location="cpu", weights_only=True)


def partitioned(tag_dir: str | Path) -> bool:
    """True for a ZeRO-1/2 checkpoint (its optimizer state is split over the ranks)."""
    return bool(glob.glob(str(Path(tag_dir) / OPTIM_STATES.format("*"))))


def to_universal(tag_dir: str | Path, out_dir: str | Path, states: dict | None = None) -> Path:
    """Write ZeRO-1/2 checkpoint tag `tag_dir` as a universal checkpoint tag `out_dir` (same tag name) for
    `engine.load_checkpoint(out_dir.parent, tag=out_dir.name)` under `"checkpoint": {"load_universal": true}`.
    `states`: its model states file, if the caller has read it already."""
    tag_dir, out_dir = Path(tag_dir), Path(out_dir)
    states = load_states(tag_dir / MODEL_STATES) if states is None else states
    world = int(states["dp_world_size"])
    shapes = {name: shape for group in states["param_shapes"] for name, shape in group.items()}
    pieces: dict[str, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    scalars: dict[str, object] = {}
    first = None
    for dp_rank in range(world):  # data-parallel order: a parameter's fragments follow each other in it
        optim = load_states(tag_dir / OPTIM_STATES.format(dp_rank))[OPTIMIZER_STATE_DICT]
        first = first or optim
        for group, mapping in enumerate(optim[SLICE_MAPPINGS]):
            flat = {"fp32": optim[FP32_GROUPS][group]}
            for key, value in optim[BASE_OPTIMIZER_STATE]["state"].get(group, {}).items():
                if torch.is_tensor(value) and value.dim() == 1 and value.numel() >= flat["fp32"].numel():
                    flat[key] = value  # per element (the last rank's may carry the group's alignment padding)
                else:  # a per-group scalar such as Adam's step: the same on every rank
                    scalars[key] = value
            for name, fragment in mapping.items():
                for key, tensor in flat.items():
                    pieces[name][key].append(tensor.narrow(0, fragment.start, fragment.numel))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    zero = out_dir / "zero"
    zero.mkdir(parents=True)
    shutil.copy2(tag_dir / MODEL_STATES, out_dir / MODEL_STATES)
    global_state = {k: v for k, v in first.items() if k not in SHARDED}
    global_state[PARAM_GROUPS] = first[BASE_OPTIMIZER_STATE][PARAM_GROUPS]
    torch.save(global_state, zero / "optimizer_state.pt")
    for name, by_key in pieces.items():
        os.makedirs(zero / name)
        for key, parts in by_key.items():
            torch.save({PARAM: torch.cat(parts).view(shapes[name]).clone()}, zero / name / f"{key}.pt")
        for key, value in scalars.items():
            torch.save(value, zero / name / f"{key}.pt")
    return out_dir


@dataclass(frozen=True)
class NodeRank:
    """This rank's place on its node, for work done once per node: a conversion by local rank 0 that the node's
    other ranks wait for (`barrier` is the process group's)."""

    local_rank: int
    barrier: Callable[[], None]

    def release(self, folder: Path) -> None:
        """Once every rank has loaded from `folder`: local rank 0 removes it."""
        self.barrier()
        if self.local_rank == 0:
            shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class Loadable:
    """How a rank loads a student checkpoint at its data-parallel size."""

    path: str  # the folder to pass to `engine.load_checkpoint(path, tag=TAG)`
    ds_config: dict  # the DeepSpeed config to initialize the engine with
    note: str | None = None  # what a resize does (None: the saved size)
    saved_module: dict | None = None  # a universal load's: the saved module, whose buffers are restored after it

    def restore_buffers(self, module: torch.nn.Module) -> None:
        """DeepSpeed's universal load sets the parameters from their fp32 master copies and leaves every buffer
        (BatchNorm running statistics and counters) as initialized; they are taken from the saved module."""
        if self.saved_module is not None:
            saved = self.saved_module
            buffers = {name: saved[name] for name, _ in module.named_buffers() if name in saved}
            module.load_state_dict(buffers, strict=False)


def loadable_at(checkpoint_dir: str, identity: str, world: int, ds_config: dict, node: NodeRank,
                scratch: contextlib.ExitStack) -> Loadable:
    """How this rank loads the checkpoint in `checkpoint_dir` (its local copy of checkpoint `identity`) at
    data-parallel size `world`. A ZeRO-1/2 checkpoint of another size is converted once per node, by local rank
    0, into a temporary folder that is removed when `scratch` closes, after every rank of the node has loaded."""
    tag = Path(checkpoint_dir) / TAG
    states = load_states(tag / MODEL_STATES)  # read once: it holds the whole student (and ZeRO-0's optimizer)
    saved = int(states["dp_world_size"])
    if saved == world:
        return Loadable(checkpoint_dir, ds_config)
    if glob.glob(str(tag / f"bf16_{OPTIM_STATES.format('*')}")):
        raise RunError(f"the student checkpoint {identity} holds DeepSpeed's BF16_Optimizer partitions (ZeRO-1 with "
                       f"bf16) of {saved} ranks, which cannot be re-partitioned here; resume with "
                       f"cluster.trainer_workers={saved}")
    if not partitioned(tag):
        return Loadable(checkpoint_dir, ds_config, f"resume: the student checkpoint of {saved} ranks loads on {world} "
                                                   "as it is (ZeRO-0 keeps the whole optimizer state in one file)")
    digest = hashlib.sha256(f"{identity}|{world}".encode()).hexdigest()[:16]
    universal = Path(tempfile.gettempdir()) / f"nayer-universal-{digest}"
    if node.local_rank == 0:
        to_universal(tag, universal / TAG, states)
    node.barrier()  # the node's other ranks load the folder local rank 0 wrote
    scratch.callback(node.release, universal)
    note = (f"resume: the ZeRO-{ds_config['zero_optimization']['stage']} student checkpoint of {saved} ranks "
            f"re-partitioned for {world} (DeepSpeed universal checkpoint)")
    ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    return Loadable(str(universal), ds_config, note, saved_module=states["module"])


def check_same_student(loaded: dict, saved: dict, where: str) -> None:
    """The student a resized resume loaded equals the weights saved beside the checkpoint, or a RunError."""
    differ = [key for key, value in saved.items() if key not in loaded or not torch.equal(loaded[key].cpu(), value)]
    if differ or loaded.keys() != saved.keys():
        raise RunError(f"the student loaded from {where} at the new number of ranks differs from its saved weights "
                       f"({len(differ)} tensor(s), e.g. {(differ or sorted(loaded.keys() ^ saved.keys()))[0]}); resume "
                       "with the number of ranks it was saved at (cluster.trainer_workers)")
