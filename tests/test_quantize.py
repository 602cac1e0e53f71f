"""nayer.quantize: bit-width grids of weights and activations, QAT by KD, the float model left alone, strict config
and buffer errors. Tiny models and random tensors only (CPU, a few seconds)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import FakeQuantizeBase

from nayer.augment import Normalize
from nayer.buffer import InMemoryBuffer
from nayer.cli_config import ConfigError, parse_config
from nayer.quantize import (
    QATConfig,
    QATTrainer,
    QuantizeConfig,
    calibrate,
    fake_quant_weights,
    load_buffer,
    quantize_model,
    run,
)
from nayer.quantize.app import main
from helpers import spec

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
IMAGES = spec(4, 16, MEAN, STD)  # what the Tiny model below takes
CIFAR = spec(10, 32)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and much faster on a CPU shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Tiny(nn.Module):
    """conv-BN-ReLU x2 (the second with a residual add), pool, fc: what FX sees in a CIFAR ResNet, in small."""

    def __init__(self, k: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, k)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn3(self.conv3(F.relu(self.bn2(self.conv2(x))))) + x)
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny_teacher(seed: int = 0) -> nn.Module:
    """A frozen float model with non-trivial BN statistics (so BN folding changes the weights)."""
    torch.manual_seed(seed)
    model = Tiny()
    for bn in (model.bn1, model.bn2, model.bn3):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return model.eval().requires_grad_(False)


def random_images(n: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def prepared(w_bits: int, a_bits: int, first_last: str = "same", teacher: nn.Module | None = None,
             per_channel: bool = True):
    teacher = teacher if teacher is not None else tiny_teacher()
    images = random_images(64)
    q = quantize_model(teacher, images[:2].float() / 255, w_bits, a_bits, per_channel, first_last)
    calibrate(q, images.split(16), Normalize(MEAN, STD), CPU)
    return teacher, q, images


def activation_fqs(q: nn.Module) -> dict[str, FakeQuantizeBase]:
    return {name: m for name, m in q.named_modules(remove_duplicate=False)
            if isinstance(m, FakeQuantizeBase) and not name.endswith("weight_fake_quant")}


# ------------------------------------------------------------------------------------------ weights
@pytest.mark.parametrize("w_bits", [2, 3, 4, 6])
def test_weights_take_at_most_2_pow_w_values_per_output_channel(w_bits):
    teacher, q, _ = prepared(w_bits, 8)
    weights = fake_quant_weights(q)
    assert set(weights) == {"conv1", "conv2", "conv3", "fc"}
    for name, w in weights.items():
        fq = q.get_submodule(name).weight_fake_quant
        assert (fq.quant_min, fq.quant_max) == (-(2 ** (w_bits - 1)), 2 ** (w_bits - 1) - 1)
        assert fq.dtype == torch.qint8 and fq.qscheme == torch.per_channel_symmetric
        for channel in w.reshape(w.shape[0], -1):
            assert channel.unique().numel() <= 2 ** w_bits, (name, w_bits)
    # The float (BN-folded) weights have many more values than the grid, so the bound above is not vacuous.
    assert teacher.conv2.weight.reshape(8, -1)[0].unique().numel() > 2 ** w_bits


def test_fake_quant_weights_are_the_weights_the_forward_uses():
    """The fused conv-BN-ReLU output equals relu(conv(x, fake_quant(folded W)) + folded bias)."""
    _, q, images = prepared(3, 8)
    seen = {}
    q.get_submodule("conv2").register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    with torch.no_grad():
        q(Normalize(MEAN, STD)(images[:4].float() / 255))
        fused = q.get_submodule("conv2")
        bn = fused.bn
        std = torch.sqrt(bn.running_var + bn.eps)
        bias = bn.bias - bn.weight * bn.running_mean / std
        expected = F.relu(F.conv2d(seen["x"], fake_quant_weights(q)["conv2"], bias, padding=1))
    torch.testing.assert_close(seen["y"], expected, atol=1e-5, rtol=1e-5)


def test_per_tensor_weights_share_one_grid():
    _, q, _ = prepared(3, 8, per_channel=False)
    w = fake_quant_weights(q)["conv2"]
    assert q.get_submodule("conv2").weight_fake_quant.qscheme == torch.per_tensor_symmetric
    assert w.unique().numel() <= 2 ** 3


def test_first_and_last_layers_at_8_bits_by_default():
    _, q, _ = prepared(2, 4, first_last="8bit")
    for name, bits in (("conv1", 8), ("conv2", 2), ("conv3", 2), ("fc", 8)):
        assert q.get_submodule(name).weight_fake_quant.quant_max == 2 ** (bits - 1) - 1, name
    nodes = {n.name: n for n in q.graph.nodes}
    image_fq = next(iter(nodes["conv1"].args)).target
    after_first = next(iter(nodes["conv1"].users)).target
    before_fc = nodes["fc"].args[0].target
    assert q.get_submodule(image_fq).quant_max == 255  # the image, input of the 8-bit first conv
    assert q.get_submodule(after_first).quant_max == 15  # the first conv's output is an a_bits activation
    assert q.get_submodule(before_fc).quant_max == 255  # the fc's input at 8 bits
    assert q.get_submodule("conv2").weight_fake_quant.quant_max == 1


def test_first_last_float_leaves_them_unquantized():
    _, q, _ = prepared(4, 4, first_last="float")
    assert not hasattr(q.get_submodule("conv1"), "weight_fake_quant")
    assert not hasattr(q.get_submodule("fc"), "weight_fake_quant")
    assert hasattr(q.get_submodule("conv2"), "weight_fake_quant")
    nodes = {n.name: n for n in q.graph.nodes}
    assert nodes["conv1"].args[0].op == "placeholder"  # the image goes in unquantized
    assert not isinstance(q.get_submodule(nodes["fc"].args[0].target), FakeQuantizeBase)  # float features into fc
    assert nodes["fc"] in [n.args[0] for n in q.graph.nodes if n.op == "output"]  # float logits out
    assert isinstance(q.get_submodule(next(iter(nodes["conv1"].users)).target), FakeQuantizeBase)


# ------------------------------------------------------------------------------------------ activations
@pytest.mark.parametrize("a_bits", [2, 3, 5])
def test_activations_take_at_most_2_pow_a_levels(a_bits):
    teacher, q, images = prepared(8, a_bits)
    fqs = activation_fqs(q)
    assert fqs and all(fq.quant_max == 2 ** a_bits - 1 and fq.quant_min == 0 for fq in fqs.values())
    outputs = {}

    def keep(module, inputs, output):  # returns None: a hook's return value would replace the output
        outputs[id(module)] = output.detach()

    for fq in {id(fq): fq for fq in fqs.values()}.values():  # FX shares one module under several names
        fq.register_forward_hook(keep)
    with torch.no_grad():
        q(Normalize(MEAN, STD)(random_images(32, seed=5).float() / 255))
    assert len(outputs) == len({id(fq) for fq in fqs.values()}) >= 4
    levels = {name: out.unique().numel() for name, out in outputs.items()}
    assert all(n <= 2 ** a_bits for n in levels.values()), levels
    assert max(levels.values()) > 1  # not a degenerate all-constant model
    # the float model's input at the same point takes far more values
    assert (Normalize(MEAN, STD)(random_images(32, seed=5).float() / 255)).unique().numel() > 2 ** a_bits


def test_calibration_sets_ranges_then_freezes_observers():
    _, q, images = prepared(4, 4)
    fq = next(iter(activation_fqs(q).values()))
    assert bool(fq.fake_quant_enabled[0]) and not bool(fq.observer_enabled[0])
    scale = fq.scale.clone()
    with torch.no_grad():
        q(Normalize(MEAN, STD)(images[:8].float() / 255) * 10)  # out-of-range input: ranges must not move
    assert torch.equal(fq.scale, scale)


# ------------------------------------------------------------------------------------------ QAT by KD
def test_qat_by_kd_lowers_the_kd_loss_on_a_fixed_batch_and_changes_weights():
    teacher = tiny_teacher()
    teacher.fc.weight.mul_(5)  # logits that vary across random images, so the KD target is not trivial
    teacher, q, images = prepared(2, 4, first_last="8bit", teacher=teacher)
    cfg = QATConfig(kd_steps=25, lr=0.02, weight_decay=0.0, crop_padding=0, flip=False, temperature=4.0)
    trainer = QATTrainer(q, teacher, cfg, IMAGES, CPU)
    fixed = images[:32]
    before_weights = {k: v.clone() for k, v in q.state_dict().items() if k.endswith("weight")}
    trainer._apply_freezes()  # the state QAT trains in (fake quant on, observers and BN frozen)
    q.eval()
    with torch.no_grad():
        loss_before = trainer.objective(fixed).item()
    losses = [trainer.step(fixed) for _ in range(cfg.kd_steps)]
    q.eval()
    with torch.no_grad():
        loss_after = trainer.objective(fixed).item()
    assert loss_before > 0
    assert loss_after < 0.5 * loss_before, (loss_before, loss_after, losses[:3], losses[-3:])
    changed = [k for k, v in q.state_dict().items() if k in before_weights and not torch.equal(v, before_weights[k])]
    assert "conv2.weight" in changed and "fc.weight" in changed


def test_float_model_is_never_modified():
    teacher = tiny_teacher()
    state = copy.deepcopy(teacher.state_dict())
    _, q, images = prepared(2, 4, teacher=teacher)
    trainer = QATTrainer(q, teacher, QATConfig(kd_steps=5, lr=0.05, freeze_bn_step=-1, freeze_observer_step=-1),
                         IMAGES, CPU)
    buffer = InMemoryBuffer()
    buffer.append(images, torch.zeros(len(images), dtype=torch.long))
    for batch, _ in buffer.batches(16, 5, torch.Generator().manual_seed(0)):
        trainer.step(batch)  # BN statistics and observers live: the most the copy can change
    trainer.finish()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert q.get_submodule("conv2").weight is not teacher.conv2.weight


def test_freeze_steps_follow_the_config():
    teacher, q, images = prepared(4, 4)
    trainer = QATTrainer(q, teacher, QATConfig(kd_steps=4, lr=1e-3, freeze_bn_step=2, freeze_observer_step=3),
                         IMAGES, CPU)
    conv2, fq = q.get_submodule("conv2"), next(iter(activation_fqs(q).values()))
    mean0 = conv2.bn.running_mean.clone()
    trainer.step(images[:16])
    assert not conv2.freeze_bn and bool(fq.observer_enabled[0])
    assert not torch.equal(conv2.bn.running_mean, mean0)  # BN statistics update before freeze_bn_step
    trainer.step(images[16:32])
    trainer.step(images[:16])
    assert conv2.freeze_bn and bool(fq.observer_enabled[0])
    mean2 = conv2.bn.running_mean.clone()
    trainer.step(images[16:32])
    assert not bool(fq.observer_enabled[0]) and torch.equal(conv2.bn.running_mean, mean2)


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("key, value", [("w_bits", 1), ("w_bits", 9), ("a_bits", 0), ("a_bits", 16)])
def test_bits_out_of_range_raise_config_error_naming_key_and_range(key, value):
    with pytest.raises(ConfigError, match=rf"{key}={value} is out of range; allowed: 2\.\.8"):
        parse_config(QuantizeConfig, ["buffer=x", "eval=y", f"{key}={value}"])


@pytest.mark.parametrize("item, pattern", [
    ("w_bit=4", r"unknown config key 'w_bit'.*did you mean 'w_bits'"),
    ("qat.stepz=3", r"unknown config key 'qat.stepz'"),
    ("qat.steps=3", r"unknown config key 'qat.steps'.*did you mean 'qat.kd_steps'"),
    ("first_last=int4", r"first_last='int4' is not allowed; choose one of: 8bit, same, float"),
    ("act_observer=mse", r"act_observer='mse' is not allowed"),
    ("qat.temperature=0", r"qat.temperature=0.0 is out of range; allowed: > 0"),
    ("calib.batches=0", r"calib.batches=0 is out of range; allowed: >= 1"),
    ("qat.freeze_bn_step=-2", r"qat.freeze_bn_step=-2 is out of range; allowed: >= -1"),
    ("device=tpu", r"device='tpu' is not allowed"),
    ("w_bits=four", r"w_bits"),
])
def test_bad_config_raises_config_error(item, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_config(QuantizeConfig, ["buffer=x", "eval=y", item])


def test_missing_buffer_or_eval_key_is_a_config_error():
    with pytest.raises(ConfigError, match="buffer="):
        parse_config(QuantizeConfig, ["eval=y"])
    with pytest.raises(ConfigError, match="eval="):
        parse_config(QuantizeConfig, ["buffer=x"])


def test_shipped_configs_parse():
    for bits, (w, a) in (("w4a8", (4, 8)), ("w6a6", (6, 6))):
        cfg = parse_config(QuantizeConfig, [f"config=configs/quantize/cifar10_{bits}.yaml", "buffer=b"])
        assert (cfg.w_bits, cfg.a_bits, cfg.arch, cfg.qat.temperature) == (w, a, "resnet56", 20.0)


# ------------------------------------------------------------------------------------------ buffer
def save_chunk(folder, images, labels, index=0):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"images": images, "labels": labels}, folder / f"chunk-{index:06d}.pt")


def test_missing_buffer_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="buffer folder not found"):
        load_buffer(tmp_path / "nope", CIFAR)


def test_empty_buffer_folder(tmp_path):
    with pytest.raises(ValueError, match="is empty: it has no chunk-"):
        load_buffer(tmp_path, CIFAR)
    save_chunk(tmp_path, torch.empty(0, 3, 32, 32, dtype=torch.uint8), torch.empty(0, dtype=torch.long))
    with pytest.raises(ValueError, match="holds 0 images"):
        load_buffer(tmp_path, CIFAR)


def test_webdataset_buffer_is_refused_with_a_reason(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match="WebDataset.*chunk-"):
        load_buffer(tmp_path, CIFAR)


def test_buffer_image_size_and_class_count_must_fit_the_model(tmp_path):
    save_chunk(tmp_path / "a", random_images(4, size=16), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(3, 16, 16\) images but the model takes \(3, 32, 32\)"):
        load_buffer(tmp_path / "a", CIFAR)
    save_chunk(tmp_path / "b", random_images(4, size=32), torch.tensor([0, 1, 2, 12]))
    with pytest.raises(ValueError, match=r"has label 12 but the model has 10 classes"):
        load_buffer(tmp_path / "b", CIFAR)


def test_run_folder_is_accepted_and_chunks_concatenate(tmp_path):
    save_chunk(tmp_path / "buffer", random_images(3, size=32), torch.tensor([0, 1, 2]), 0)
    save_chunk(tmp_path / "buffer", random_images(2, size=32), torch.tensor([3, 4]), 1)
    x, y = load_buffer(tmp_path, CIFAR).tensors()
    assert x.shape == (5, 3, 32, 32) and y.tolist() == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture()
def small_run(tmp_path):
    save_chunk(tmp_path / "run" / "buffer", random_images(24, size=32), torch.arange(24) % 10)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "test.npz", x=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
             y=np.arange(20) % 10, classes=np.array([f"c{i}" for i in range(10)]))
    return ["arch=resnet20", f"buffer={tmp_path / 'run' / 'buffer'}", f"eval={tmp_path / 'test.npz'}", "device=cpu",
            "calib.batches=2", "calib.batch_size=8", "qat.kd_steps=3", "qat.batch_size=8", "qat.log_every=2",
            "w_bits=4", "a_bits=6", f"out={tmp_path / 'summary.json'}"]


def test_run_end_to_end_summary(small_run, tmp_path):
    summary = run(parse_config(QuantizeConfig, small_run))
    for key in ("float_top1", "ptq_top1", "recovered_top1"):
        assert 0.0 <= summary[key] <= 100.0
    assert (summary["w_bits"], summary["a_bits"], summary["synthetic_images"], summary["calib_images"]) == (4, 6, 24, 16)
    assert [c["step"] for c in summary["kd_loss_curve"]] == [2, 3]
    assert {"calibrate", "qat", "float_eval", "ptq_eval", "recovered_eval", "total"} <= set(summary["seconds"])
    assert json.loads((tmp_path / "summary.json").read_text())["bits"] == "W4A6"


def test_cli_prints_one_json_line(small_run, capsys):
    main(small_run + ["qat.kd_steps=0"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["recovered_top1"] == json.loads(lines[0])["ptq_top1"]


def test_a_pipeline_buffer_is_quantized_through_orchestrator_quantize(small_run, tmp_path, capsys):
    from orchestrator.quantize import main as pipeline_main
    from orchestrator.shards import Manifest, write_shards

    buffer = tmp_path / "pipeline" / "buffer"
    Manifest(buffer).commit(write_shards(buffer, 0, 0, random_images(24, size=32), torch.arange(24) % 10, 10))
    argv = [a for a in small_run if not a.startswith("buffer=")] + [f"buffer={tmp_path / 'pipeline'}"]
    pipeline_main(argv)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["synthetic_images"] == 24
    with pytest.raises(SystemExit, match="WebDataset shards of orchestrator.run .*python -m orchestrator.quantize"):
        main(argv)
    shard = buffer / "round-00000" / "worker-000-000000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match=f"error: buffer shard {shard.resolve()}: its sha256 does not match"):
        pipeline_main(argv)


@pytest.mark.parametrize("extra, message", [
    (["w_bits=12"], "error: w_bits=12 is out of range; allowed: 2..8"),
    (["bitz=4"], "error: unknown config key 'bitz'"),
    (["buffer=/nonexistent/buffer"], "error: buffer folder not found: '/nonexistent/buffer'"),
    (["buffer=BAD_LABELS"], "error: buffer '"),  # class count mismatch: label 12 for a 10-class model
    (["buffer=EMPTY"], "error: buffer folder '"),
])
def test_cli_bad_input_is_one_line_error(small_run, extra, message, tmp_path):
    save_chunk(tmp_path / "bad", random_images(4, size=32), torch.tensor([0, 1, 2, 12]))
    (tmp_path / "empty").mkdir()
    extra = [e.replace("BAD_LABELS", str(tmp_path / "bad")).replace("EMPTY", str(tmp_path / "empty")) for e in extra]
    with pytest.raises(SystemExit) as exc:
        main(small_run + extra)
    text = str(exc.value)
    assert text.startswith(message) and "\n" not in text, text


def test_module_imports_no_orchestrator_stack():
    code = ("import sys, nayer.quantize, nayer.run; bad = [m for m in ('ray', 'deepspeed', 'orchestrator') if m in sys.modules];"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
