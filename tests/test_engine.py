"""The method's moving parts: noisy layers, losses, best-of-steps, buffer, augmentation."""

import pytest
import torch
from torch import nn

from nayer.augment import Augment, float_to_uint8, random_crop
from nayer.buffer import InMemoryBuffer
from nayer.config import RunConfig
from nayer.generator import balanced_targets
from nayer.losses import BNStatisticsLoss, adversarial_loss, kd_loss
from nayer.methods.base import SynthesisParts
from nayer.methods.nayer import NayerSynthesizer
from helpers import CPU, CPU_CHANNELS_LAST, generator, spec, teacher_with_statistics, tiny_net


def tiny_synth(batch_size=20, g_steps=3, g_loops=2, k=10, **syn):
    cfg = RunConfig()
    cfg.synthesis.batch_size, cfg.synthesis.g_steps, cfg.synthesis.g_loops = batch_size, g_steps, g_loops
    cfg.synthesis.warmup_loops = g_loops
    cfg.generator.nz, cfg.generator.ngf = 32, 8
    for key, value in syn.items():
        setattr(cfg.synthesis, key, value)
    parts = SynthesisParts(teacher_with_statistics(k), tiny_net(k), torch.randn(k, 12), spec(k), CPU)
    return NayerSynthesizer(parts, cfg.generator, cfg.synthesis)


def test_balanced_targets_k_to_1():
    y = balanced_targets(23, 10, torch.Generator().manual_seed(0))
    assert y.shape == (23,)
    assert torch.equal(y[:20], torch.arange(10).repeat(2))
    assert ((y[20:] >= 0) & (y[20:] < 10)).all()


@pytest.mark.parametrize("mode,layers", [("k_to_1", 3), ("one_to_one", 25)])
def test_noisy_layer_shapes(mode, layers):
    g = generator(torch.randn(10, 12), 25, 32, nz=40, ngf=8, noisy_mode=mode)
    assert g.noisy.weights[0].shape == (layers, 12, 40)
    out = g(balanced_targets(25, 10))
    assert out.shape == (25, 3, 32, 32)
    assert out.min() >= 0 and out.max() <= 1


def test_noisy_chunks_use_their_own_layer():
    g = generator(torch.randn(4, 6), 8, 16, nz=5, ngf=4, noisy_mode="k_to_1")
    e = torch.randn(8, 6)
    out = g.noisy(e)
    w, b = g.noisy.weights[0], g.noisy.biases[0]
    assert torch.allclose(out[:4], e[:4] @ w[0] + b[0], atol=1e-5)
    assert torch.allclose(out[4:], e[4:] @ w[1] + b[1], atol=1e-5)


@pytest.mark.parametrize("arch", ["A1", "A2", "A3", "A4", "A5", "A6", "A7", "A8"])
def test_noisy_shapes_of_table5(arch):
    g = generator(torch.randn(10, 12), 20, 32, nz=16, ngf=8, noisy_arch=arch)
    assert isinstance(g.emb_bn, nn.BatchNorm1d) == (arch not in ("A1", "A2"))
    assert len(g.noisy.weights) == (2 if arch in ("A2", "A4") else 1)
    assert g(balanced_targets(20, 10)).shape == (20, 3, 32, 32)


def test_noisy_layers_reinit_each_iteration_but_bn1d_persists():
    syn = tiny_synth(g_loops=1)
    gen = syn.generator
    seen_w, seen_bn = [], []
    original = gen.reinit_noisy

    def spy():
        original()
        seen_w.append(gen.noisy.weights[0].detach().clone())
        seen_bn.append(gen.emb_bn.weight.detach().clone())
    gen.reinit_noisy = spy
    syn.synthesize(warmup=True)
    bn_after_first = gen.emb_bn.weight.detach().clone()
    w_after_first = gen.noisy.weights[0].detach().clone()
    syn.synthesize(warmup=True)
    assert len(seen_w) == 2
    assert not torch.allclose(seen_w[0], w_after_first)  # the iteration trained the noisy layer ...
    assert not torch.allclose(seen_w[1], w_after_first)  # ... and the next one starts from fresh weights
    assert not torch.allclose(seen_w[0], seen_w[1])
    # the embedding BN1d was trained in iteration 1 and is carried into iteration 2 untouched
    assert not torch.allclose(bn_after_first, torch.ones_like(bn_after_first))
    assert torch.equal(seen_bn[1], bn_after_first)


def test_reinit_values_are_standard_normal_and_zero_bias():
    g = generator(torch.randn(10, 64), 100, 32, nz=200, ngf=8)
    with torch.no_grad():
        g.noisy.weights[0].fill_(3.0)
        g.noisy.biases[0].fill_(1.0)
    g.reinit_noisy()
    w = g.noisy.weights[0]
    assert abs(w.mean().item()) < 0.01 and abs(w.std().item() - 1.0) < 0.01
    assert g.noisy.biases[0].abs().max().item() == 0.0


def test_generator_replaced_every_g_life_epochs():
    syn = tiny_synth(g_loops=1, g_steps=1)
    syn.gen_cfg.g_life = 2
    ids = []
    for _ in range(5):
        syn.synthesize(warmup=True)
        ids.append(id(syn.generator))
    assert ids[0] == ids[1] != ids[2] == ids[3] != ids[4]


def test_bn_loss_matches_hand_computation_with_ema():
    torch.manual_seed(0)
    net = tiny_net().eval()
    bn1, bn2 = net[1], net[4]
    with torch.no_grad():
        for bn in (bn1, bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    loss = BNStatisticsLoss(net, momentum=0.9)
    x1, x2 = torch.randn(8, 3, 5, 5), torch.randn(8, 3, 5, 5)

    def stats(x):  # inputs of bn1 and bn2, by hand
        h1 = net[0](x)
        h2 = net[3](net[2](net[1](h1)))
        return [(h.mean((0, 2, 3)), h.permute(1, 0, 2, 3).reshape(h.shape[1], -1).var(1, unbiased=False)) for h in (h1, h2)]

    def expected(st, ema):
        total = 0
        for bn, (m, v), e in zip((bn1, bn2), st, ema):
            if e is not None:
                m, v = 0.1 * m + 0.9 * e[0], 0.1 * v + 0.9 * e[1]
            total += torch.norm(bn.running_mean - m, 2) + torch.norm(bn.running_var - v, 2)
        return total

    with torch.no_grad(), loss.capture():
        net(x1)
    s1 = stats(x1)
    assert torch.allclose(loss.loss(), expected(s1, [None, None]), atol=1e-5)  # first iteration: batch stats only
    loss.update_ema()
    with torch.no_grad(), loss.capture():
        net(x2)
    s2 = stats(x2)
    assert torch.allclose(loss.loss(), expected(s2, s1), atol=1e-5)
    loss.update_ema()
    ema = [(0.9 * a[0] + 0.1 * b[0], 0.9 * a[1] + 0.1 * b[1]) for a, b in zip(s1, s2)]
    assert torch.allclose(loss.ema[0][0], ema[0][0], atol=1e-6) and torch.allclose(loss.ema[1][1], ema[1][1], atol=1e-6)


def scaled_bn_input(net: nn.Module, c: float) -> None:
    """Multiply bn1's input (the first conv) and bn1's statistics by c: what bn1 hands on is unchanged."""
    with torch.no_grad():
        net[0].weight.mul_(c)
        if net[0].bias is not None:
            net[0].bias.mul_(c)
        net[1].running_mean.mul_(c)
        net[1].running_var.mul_(c * c)
        net[1].eps *= c * c


def tiny_net_with_running_statistics() -> torch.nn.Module:
    """tiny_net in eval mode with running means in [-1, 1] and running variances in [0.5, 2]."""
    torch.manual_seed(0)
    net = tiny_net().eval()
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return net


@pytest.mark.parametrize("form", ["relative", "normalized", "kl"])
def test_scale_free_bn_losses_ignore_the_teachers_activation_scale(form):
    net = tiny_net_with_running_statistics()
    x = torch.randn(8, 3, 5, 5)

    def value(loss):
        with torch.no_grad(), loss.capture():
            net(x)
        return loss.loss().item()

    scale_free, paper = BNStatisticsLoss(net, 0.0, form), BNStatisticsLoss(net, 0.0, "paper")
    before, paper_before = value(scale_free), value(paper)
    scaled_bn_input(net, 30.0)
    assert value(scale_free) == pytest.approx(before, rel=1e-4)
    assert value(paper) > 5 * paper_before  # the paper's form grows with the scale


def test_kl_bn_loss_is_the_gaussian_kl_and_zero_at_the_running_statistics():
    torch.manual_seed(0)
    net = tiny_net().eval()
    x = torch.randn(8, 3, 5, 5)
    loss = BNStatisticsLoss(net, 0.0, "kl")
    with torch.no_grad(), loss.capture():
        net(x)
    with torch.no_grad():  # running statistics := this batch's: both scale-free forms vanish
        for bn, (m, v) in zip(loss.layers, loss.batch):
            bn.running_mean.copy_(m)
            bn.running_var.copy_(v)
    assert loss.loss().item() == pytest.approx(0.0, abs=1e-6)
    for form in ("normalized", "relative"):
        other = BNStatisticsLoss(net, 0.0, form)
        other.batch = loss.batch  # the same recorded statistics (a new forward would see the changed bn1)
        assert other.loss().item() == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        for bn in loss.layers:
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    expected = 0.0
    for bn, (m, v) in zip(loss.layers, loss.batch):
        batch = torch.distributions.Normal(m, (v + bn.eps).sqrt())
        running = torch.distributions.Normal(bn.running_mean, (bn.running_var + bn.eps).sqrt())
        expected += torch.distributions.kl_divergence(batch, running).mean().item() / len(loss.layers)
    assert loss.loss().item() == pytest.approx(expected, rel=1e-4)


def test_relative_bn_loss_is_the_papers_distances_over_the_running_statistics_size():
    net = tiny_net_with_running_statistics()
    relative = BNStatisticsLoss(net, 0.0, "relative")
    with torch.no_grad(), relative.capture():
        net(torch.randn(8, 3, 5, 5))
    expected = 0.0
    for bn, (m, v) in zip(relative.layers, relative.batch):
        s2 = bn.running_var + bn.eps
        expected += ((m - bn.running_mean).norm() / s2.sum().sqrt() + (v + bn.eps - s2).norm() / s2.norm()).item()
    assert relative.loss().item() == pytest.approx(expected / len(relative.layers), rel=1e-5)


def test_bn_hooks_record_nothing_outside_capture():
    net = tiny_net().eval()
    loss = BNStatisticsLoss(net)
    net(torch.randn(2, 3, 5, 5))
    assert loss.batch == [None, None]


def test_masked_adversarial_kl_is_zero_where_argmax_differs():
    t = torch.tensor([[5.0, 0.0, 0.0], [0.0, 4.0, 1.0]])
    s_disagree = torch.tensor([[0.0, 5.0, 0.0], [3.0, 0.0, 1.0]])
    assert adversarial_loss(s_disagree, t).item() == 0.0
    s_agree = torch.tensor([[2.0, 1.0, 0.0], [0.0, 4.0, 1.0]])
    p = torch.softmax(t[0], 0)
    kl0 = (p * (p.log() - torch.log_softmax(s_agree[0], 0))).sum()
    # row 1 agrees exactly (KL 0); row 0 agrees on argmax with KL kl0; mean over the batch of 2, negated
    assert torch.allclose(adversarial_loss(s_agree, t), -kl0 / 2, atol=1e-6)
    mixed = torch.stack([s_agree[0], s_disagree[1]])
    assert torch.allclose(adversarial_loss(mixed, t), -kl0 / 2, atol=1e-6)


def test_kd_loss_temperature_scaling():
    generator = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 10, generator=generator), torch.randn(4, 10, generator=generator)
    T = 20.0
    p = torch.softmax(t / T, 1)
    expected = (p * (p.log() - torch.log_softmax(s / T, 1))).sum(1).mean() * T * T
    assert torch.allclose(kd_loss(s, t, T), expected, rtol=1e-4)  # x T^2 = 400 scales float32 rounding too
    assert kd_loss(t, t, T).abs().item() < 1e-5


def test_best_of_steps_keeps_lowest_loss_batch():
    syn = tiny_synth(g_steps=6, g_loops=1)
    produced = []
    forward = syn.generator.forward

    def recording_forward(targets):
        x = forward(targets)
        produced.append(x.detach().clone())
        return x
    syn.generator.forward = recording_forward
    result = syn.synthesize(warmup=True)
    losses = [total for total, _ in result.curves[0]]
    assert len(losses) == 6 and len(set(losses)) > 1
    best = min(range(6), key=lambda i: losses[i])
    assert torch.equal(result.images, float_to_uint8(produced[best]))
    assert result.stats["syn_loss"] == pytest.approx(losses[best])


def test_synthesis_does_not_touch_teacher_or_student():
    syn = tiny_synth(g_steps=2, g_loops=2)
    before_t = [p.clone() for p in syn.teacher.parameters()]
    before_s = {k: v.clone() for k, v in syn.student.state_dict().items()}
    syn.synthesize(warmup=False)  # with the adversarial term
    assert all(torch.equal(a, b) for a, b in zip(before_t, syn.teacher.parameters()))
    assert all(torch.equal(before_s[k], v) for k, v in syn.student.state_dict().items())
    assert all(p.grad is None for p in syn.student.parameters())
    assert all(p.requires_grad for p in syn.student.parameters())  # restored for KD


def test_synthesis_output_and_ema_state_round_trip():
    syn = tiny_synth(batch_size=20, g_steps=2, g_loops=3)
    r = syn.synthesize(warmup=False)
    assert r.images.shape == (60, 3, 16, 16) and r.images.dtype == torch.uint8
    assert torch.equal(r.labels[:20], torch.arange(10).repeat(2))
    other = tiny_synth(batch_size=20, g_steps=2, g_loops=3)
    other.teacher.load_state_dict(syn.teacher.state_dict())
    other.load_state_dict(syn.state_dict())
    assert other.epoch == 1
    assert all(torch.equal(a[0], b[0]) for a, b in zip(syn.bn_loss.ema, other.bn_loss.ema))


def test_teacher_without_bn_needs_a_bn_zero():
    cfg = RunConfig()
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    with pytest.raises(ValueError, match="a_bn=0"):
        NayerSynthesizer(SynthesisParts(teacher, tiny_net(), torch.randn(10, 8), spec(), CPU), cfg.generator,
                         cfg.synthesis)


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    out = random_crop(x, 2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, dy:dy + 6, dx:dx + 6] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_augment_is_differentiable_and_normalizes():
    aug = Augment([0.5] * 3, [0.5] * 3, crop_padding=0, flip=False)
    x = torch.full((2, 3, 4, 4), 1.0, requires_grad=True)
    y = aug(x)
    assert torch.allclose(y, torch.ones_like(y))
    y.sum().backward()
    assert x.grad is not None


def test_buffer_passes_cover_every_image_once():
    buf = InMemoryBuffer()
    buf.append(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).clone(), torch.arange(10))
    buf.append(torch.arange(10, 16, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 3, 2, 2).clone(), torch.arange(6))
    assert len(buf) == 16
    seen = torch.cat([x[:, 0, 0, 0] for x, _ in buf.batches(4, 4, torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(16))


def test_buffer_rejects_float_images_and_persists_chunks(tmp_path):
    buf = InMemoryBuffer()
    with pytest.raises(ValueError, match="uint8"):
        buf.append(torch.rand(2, 3, 4, 4), torch.zeros(2, dtype=torch.long))
    buf.append(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([1, 2]))
    buf.save_chunk(tmp_path, 0)
    assert not list(tmp_path.glob("*.tmp"))
    again = InMemoryBuffer.load(tmp_path, 1)
    assert torch.equal(again.tensors()[1], torch.tensor([1, 2]))
    with pytest.raises(FileNotFoundError, match="chunk-000001"):
        InMemoryBuffer.load(tmp_path, 2)
    with pytest.raises(RuntimeError, match="empty"):
        InMemoryBuffer().tensors()


@pytest.mark.parametrize("body,size", [("cifar", 32), ("imagenet_paper", 64), ("imagenet_reference", 64)])
def test_paper_variant_has_spectral_norm_and_trailing_bn(body, size):
    g = generator(torch.randn(10, 12), 10, size, nz=16, ngf=8, body=body, paper_variant=True, mean=[0.5] * 3,
                  std=[0.25] * 3)
    convs = [m for m in g.body.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(nn.utils.parametrize.is_parametrized(c, "weight") for c in convs)
    assert isinstance(g.body.conv_blocks[-2], nn.BatchNorm2d)
    assert g(balanced_targets(10, 10)).shape == (10, 3, size, size)
    plain = generator(torch.randn(10, 12), 10, size, nz=16, ngf=8, body=body)
    assert isinstance(plain.body.conv_blocks[-1], nn.Sigmoid)


def test_evaluate_top1_and_per_class():
    import numpy as np

    from nayer.data import LabeledImages
    from nayer.evaluate import evaluate

    class AlwaysClassOne(nn.Module):
        def forward(self, x):
            return torch.tensor([0.0, 1.0, 0.0]).expand(x.shape[0], 3)
    x = np.zeros((6, 4, 4, 3), dtype=np.uint8)
    y = np.array([0, 1, 1, 1, 2, 2])
    result = evaluate(AlwaysClassOne(), LabeledImages(x, y), spec(3, 4), CPU, batch_size=4)
    assert result["top1"] == pytest.approx(50.0)
    assert result["per_class"] == [0.0, 100.0, 0.0]
    with pytest.raises(ValueError, match="uint8"):
        LabeledImages(x.astype(np.float32), y)


@pytest.mark.parametrize("arch", ["resnet20_a", "wrn16_1", "vgg11_bn", "alexnet", "resnet18"])
def test_zoo_models_work_as_teacher_and_student(arch):
    """Synthesis (hooks, input gradients) and a KD step run with each family in both roles."""
    from nayer.kd import StudentTrainer
    from nayer.models import build_model

    cfg = RunConfig()
    cfg.synthesis.batch_size, cfg.synthesis.g_steps, cfg.synthesis.g_loops = 10, 1, 1
    cfg.generator.nz, cfg.generator.ngf = 16, 8
    if arch == "alexnet":
        cfg.synthesis.a_bn = 0.0  # no BatchNorm: the BN prior must be switched off (supplementary Table 9)
    teacher = build_model(arch, 10).eval().requires_grad_(False)
    student = build_model(arch, 10)
    syn = NayerSynthesizer(SynthesisParts(teacher, student, torch.randn(10, 8), spec(10, 32), CPU_CHANNELS_LAST),
                           cfg.generator, cfg.synthesis)
    result = syn.synthesize(warmup=False)
    trainer = StudentTrainer(student, teacher, cfg.kd, 1, spec(10, 32), CPU_CHANNELS_LAST)
    assert trainer.train_epoch([(result.images, result.labels)])["kd_steps"] == 1


def test_buffer_batches_gather_across_chunks_like_the_concatenated_data():
    buf = InMemoryBuffer()
    for start, size in ((0, 3), (3, 5), (8, 2)):
        ids = torch.arange(start, start + size)
        buf.append(ids.to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).clone(), ids * 10)
    images, labels = buf.tensors()
    for x, y in buf.batches(4, 5, torch.Generator().manual_seed(1)):
        idx = x[:, 0, 0, 0].long()
        assert torch.equal(x, images[idx]) and torch.equal(y, labels[idx])
    with pytest.raises(ValueError, match=r"shape \(3, 2, 2\)"):
        buf.append(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.zeros(1, dtype=torch.long))


def test_adversarial_gradients_stay_finite_for_a_confident_teacher():
    # Logit gaps of 300: the teacher's softmax underflows to exactly 0 for the other classes. During synthesis the
    # gradient reaches the generator through the teacher's logits too.
    teacher = torch.tensor([[300.0, 0.0, -10.0], [0.0, 250.0, 5.0]], requires_grad=True)
    student = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]], requires_grad=True)  # sample 2 masked out
    loss = adversarial_loss(student, teacher)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all() and torch.isfinite(teacher.grad).all()
    assert torch.equal(student.grad[1], torch.zeros(3))
