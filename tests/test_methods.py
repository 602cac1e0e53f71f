"""The baselines (FM, DeepInversion), the generator-input ablations and the paper's synthesis metrics."""

import math

import pytest
import torch

from nayer.methods.deepinv import js_divergence, total_variation
from nayer.cli_config import parse_config
from nayer.config import RunConfig
from nayer.generator import GENERATOR_INPUTS, NOISY_SHAPES
from nayer.methods import build_synthesizer
from nayer.metrics import FeatureBank, ce_steps, diversity, inception_score
from nayer.run import run
from helpers import CPU, spec, teacher_with_statistics, tiny_net

IMAGES = spec(10, 16, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))


def synthesizer(method="nayer", *extra, teacher=None):
    cfg = parse_config(RunConfig, [f"method={method}", "generator.nz=16", "generator.ngf=8", "synthesis.batch_size=20",
                                   "synthesis.g_steps=3", "synthesis.g_loops=2", "synthesis.warmup_loops=1",
                                   "fm.nz=12", *extra])
    teacher = teacher or teacher_with_statistics()
    return build_synthesizer(cfg, teacher, tiny_net(), torch.randn(10, 8), IMAGES, CPU, 0), cfg


@pytest.mark.parametrize("method", ["nayer", "fm", "deepinv"])
def test_every_method_makes_uint8_batches_with_metrics(method):
    syn, cfg = synthesizer(method)
    warm = syn.synthesize(warmup=True)
    result = syn.synthesize(warmup=False)  # adversarial term on
    assert warm.images.shape == (20, 3, 16, 16) and result.images.shape == (40, 3, 16, 16)
    assert result.images.dtype == torch.uint8 and result.labels.min() >= 0 and result.labels.max() < 10
    stats = result.stats
    assert stats["syn_steps"] == 6 and math.isfinite(stats["syn_loss"]) and math.isfinite(stats["syn_adv"])
    assert 1 <= stats["syn_ce_steps"] <= 3 and len(stats["syn_ce_curve"]) == 3 and stats["syn_is"] >= 1
    assert warm.stats["syn_diversity"] is None and stats["syn_diversity"] > stats["syn_diversity_min"] > 0
    state = syn.state_dict()
    again, _ = synthesizer(method)
    again.load_state_dict(state)
    assert again.epoch == 2 and again.metrics.bank.seen == 60


def test_fm_meta_step_changes_the_meta_generator_by_the_clones_summed_gradients():
    syn, _ = synthesizer("fm")
    before = {k: v.clone() for k, v in syn.generator.state_dict().items()}
    syn.synthesize(warmup=True)
    changed = [k for k, v in syn.generator.state_dict().items() if not torch.equal(v, before[k])]
    assert "l1.weight" in changed and len(changed) > 5
    # First-order MAML: the meta gradient is the sum of the clone's gradients over the g = 3 inner steps, and the
    # meta Adam's learning rate is lr_g * g.
    assert syn.meta_optimizer.param_groups[0]["lr"] == pytest.approx(5e-3 * 3)
    grad = syn.generator.l1.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_deepinversion_pixels_stay_valid_images():
    syn, _ = synthesizer("deepinv", "deepinv.lr=5.0")  # a large step: unclipped pixels would leave [0, 1]
    captured = []
    original = syn._iteration

    def iteration(use_adv, bar, index):
        images, *rest = original(use_adv, bar, index)
        captured.append(images)
        return (images, *rest)

    syn._iteration = iteration
    syn.synthesize(warmup=False)
    for images in captured:
        assert images.min() >= -1e-5 and images.max() <= 1 + 1e-5
        assert images.std() > 0.05  # not collapsed to a constant


def test_js_divergence_and_total_variation_by_hand():
    same = torch.tensor([[2.0, 0.0, -1.0]])
    assert js_divergence(same, same).item() == pytest.approx(0.0, abs=1e-7)
    # softmax(./3) of these is (3/4, 1/4) and (1/4, 3/4); M = (1/2, 1/2); KL(M || P) = KL(M || Q) = ln(4/3) / 2
    s, t = torch.tensor([[3 * math.log(3), 0.0]]), torch.tensor([[0.0, 3 * math.log(3)]])
    assert js_divergence(s, t, temperature=3.0).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-5)
    x = torch.zeros(1, 1, 2, 2)
    x[0, 0, 0, 0] = 1.0  # differences: horizontal 1, vertical 1, diagonals 0 and 1
    assert total_variation(x).item() == pytest.approx(3.0)


@pytest.mark.parametrize("value", [v for v in GENERATOR_INPUTS])
def test_every_generator_input_ablation_runs(value):
    syn, _ = synthesizer("nayer", f"generator.input={value}")
    result = syn.synthesize(warmup=True)
    assert result.images.shape == (20, 3, 16, 16) and math.isfinite(result.stats["syn_loss"])
    assert (syn.generator.noisy is not None) == (value == "lte_nl")


def test_z_inputs_are_drawn_anew_every_iteration_and_lte_is_not_random():
    for value, random in [("z", True), ("cat_lte_z", True), ("sum_oh_z", True), ("lte", False), ("onehot", False)]:
        syn, _ = synthesizer("nayer", f"generator.input={value}")
        gen = syn.generator.eval()
        y = torch.arange(10).repeat(2)
        gen.reinit_noisy()
        first = gen(y)
        gen.reinit_noisy()
        assert (not torch.equal(first, gen(y))) == random, value


@pytest.mark.parametrize("mode", ["k_to_1", "one_to_one"])
@pytest.mark.parametrize("arch", list(NOISY_SHAPES))
def test_every_noisy_layer_shape_and_mode_runs(mode, arch):
    syn, _ = synthesizer("nayer", f"generator.noisy.mode={mode}", f"generator.noisy.arch={arch}")
    assert syn.synthesize(warmup=True).images.shape == (20, 3, 16, 16)


def test_metrics_match_hand_computations():
    assert ce_steps([2.0, 0.5, 0.05, 0.01], 0.1) == 3 and ce_steps([2.0, 0.5], 0.1) is None
    assert inception_score(torch.full((4, 5), 0.2)) == pytest.approx(1.0)  # every image alike: IS = 1
    assert inception_score(torch.eye(4)) == pytest.approx(4.0, rel=1e-6)  # 4 confident, distinct classes: IS = K
    probs = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    marginal = probs.mean(0)
    kl = (probs * (probs / marginal).log()).sum(1).mean()
    assert inception_score(probs) == pytest.approx(math.exp(kl.item()), rel=1e-6)
    new = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    earlier = torch.tensor([[0.0, 1.0], [3.0, 0.0]])
    # distances: (0,0)->(0,1) 1, (0,0)->(3,0) 3, (3,4)->(0,1) sqrt(18), (3,4)->(3,0) 4
    mean, nearest = diversity(new, earlier)
    assert mean == pytest.approx((1 + 3 + math.sqrt(18) + 4) / 4) and nearest == pytest.approx((1 + 4) / 2)


def test_feature_bank_is_a_bounded_uniform_sample_and_restores():
    bank = FeatureBank(capacity=50, seed=0)
    bank.add(torch.arange(1000, dtype=torch.float32).view(-1, 1))
    kept = bank.tensor().flatten()
    assert bank.seen == 1000 and kept.numel() == 50 and len(set(kept.tolist())) == 50
    assert kept.mean() > 250  # a sample of all 1000, not the first 50 (whose mean is 24.5)
    copy = FeatureBank(capacity=50, seed=0)
    copy.load_state_dict(bank.state_dict())
    assert torch.equal(copy.tensor(), bank.tensor()) and copy.seen == 1000


@pytest.mark.parametrize("method", ["fm", "deepinv"])
def test_single_process_run_with_a_baseline_logs_the_metrics(tmp_path, method):
    args = [f"method={method}", "data.dataset=digits", "data.eval=digits:test", "teacher.arch=resnet20",
            "student.arch=resnet20", "lte.encoder=onehot", f"out_dir={tmp_path}", "name=b", "warmup=1", "epochs=1",
            "generator.nz=16", "generator.ngf=8", "fm.nz=16", "synthesis.batch_size=20", "synthesis.g_steps=2",
            "synthesis.g_loops=1", "synthesis.warmup_loops=1", "kd.batch_size=16", "kd.kd_steps=2",
            f"lte.cache_dir={tmp_path / 'lte'}"]
    summary = run(parse_config(RunConfig, args))
    assert summary["epochs_run"] == 2 and summary["buffer_images"] == 40
    import json
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["syn_diversity"] > 0 and records[1]["syn_is"] >= 1 and len(records[1]["syn_ce_curve"]) == 2
