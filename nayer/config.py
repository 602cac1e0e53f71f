"""The run config schema: every knob of NAYER (paper Table 6 + reference scripts) is a key here.

Defaults are the CIFAR-10 values of the method's spec (`docs/nayer-spec.md`: paper Table 6 and the reference
code); `configs/*.yaml` set the other datasets. Parsed strictly by :func:`nayer.cli_config.parse_config` (a typo fails and lists the valid keys).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

from torch import nn

from nayer.cli_config import ConfigError
from nayer.generator import GENERATOR_BODIES, GENERATOR_INPUTS, NOISY_MODES, NOISY_SHAPES
from nayer.losses import BN_LOSS_FORMS
from nayer.lte import ENCODERS
from nayer.models import check_arch, load_model, load_teacher
from nayer.runtime import check_device_name

NONFINITE_POLICIES = ("stop", "skip")
TARGET_MODES = ("balanced", "slices")
KD_CROPS = ("pad", "resized")
PROMPT_NAMES = ("auto", "class_names", "wordnet")


@dataclass
class DataConfig:
    dataset: str = "cifar10"  # preset: class count, image size, mean/std, class names
    class_names: Optional[List[str]] = None  # one per teacher output; None = the weights' names, else the preset's
    class_names_file: str = ""  # text file, one name per line (TinyImageNet, custom teachers)
    # The teacher's input. None = what the teacher's pretrained weights say (torchvision meta, timm pretrained_cfg),
    # else the preset's; inputs.json in the run folder records where each value came from.
    image_size: Optional[int] = None  # square side of the synthetic images
    mean: Optional[List[float]] = None  # input normalization
    std: Optional[List[float]] = None  # input normalization std
    eval: str = ""  # labeled test set: a .npz (shared/data format), an image folder, or digits:test; "" = none
    # An image folder's images: short side resized to image_size / eval_crop_pct, then a centered image_size crop
    # (0.875 = the standard Resize 256 / CenterCrop 224). None = the preset's (ImageNet 0.875, the others 1).
    eval_crop_pct: Optional[float] = None
    eval_workers: int = 4  # loader processes decoding an image folder (JPEG decode is the cost at 50k images)
    # A folder for an image folder's decoded, resized images: one memory-mapped x.npy per (folder, size, crop),
    # written on first use (manifest last) and read by later runs, each pipeline rank copying only its slice.
    # "" = nayer.run decodes into memory; the pipeline decodes into the run folder's eval-cache/.
    eval_cache: str = ""
    eval_batch_size: int = 500  # images per evaluation forward pass
    eval_limit: int = 0  # evaluate on a fixed random subset of this many labeled images (quick looks); 0 = all


@dataclass
class ModelConfig:
    # zoo name (nayer.models.model_names), torchvision:<name>, timm:<name>[.<tag>] or <package.module>:<function>
    arch: str = "resnet56"
    checkpoint: str = ""  # state_dict file (loaded with weights_only=True)
    weights: str = ""  # pretrained weights: a torchvision tag (IMAGENET1K_V2, DEFAULT) or, for timm, pretrained
    rename: List[str] = field(default_factory=list)  # checkpoint key renaming, OLD->NEW regex prefix pairs

    def build(self, *, num_classes: int, role: str) -> nn.Module:
        """The model with a `num_classes`-way head and its weights: the checkpoint file, the source's pretrained
        weights, or a random init. `role` names the config keys in errors; a teacher comes frozen (eval mode, no
        gradients)."""
        given = (self.arch, num_classes, self.checkpoint or None, self.weights or None, self.rename)
        return load_teacher(*given) if role == "teacher" else load_model(*given, role=role)


@dataclass
class LTEConfig:
    encoder: str = "clip"  # clip | sbert | onehot | file
    model: str = "ViT-B-32"  # open_clip model name (clip encoder)
    pretrained: Optional[str] = "openai"  # open_clip tag or local checkpoint path; null = random (tests only)
    path: str = ""  # precomputed [K, D] tensor (file encoder)
    template: str = "reference"  # reference ("a image of {name}"), index ("a class of {index}") or a literal
    # What {name} is: class_names = the run's class names | wordnet = the ImageNet-1k class's full WordNet line
    # ("tench, Tinca tinca", the reference's imagenet_label.txt, not torchvision's short category names) | auto =
    # wordnet for data.dataset=imagenet with 1000 classes, else class_names
    names: str = "auto"
    cache_dir: str = ".cache/lte"  # embeddings cached by (encoder, model, template, names); "" = no cache


@dataclass
class NoisyConfig:
    mode: str = "k_to_1"  # k_to_1: one layer per chunk of K targets; one_to_one: one layer per image
    arch: str = "A3"  # supplementary Table 5 shape; A3 = BN1d (persistent) + Linear, the reference's


@dataclass
class GeneratorConfig:
    # What G is fed (paper Fig. 5, supplementary B.4): lte_nl = LTE -> noisy layer (NAYER; noisy.mode 1-to-1 or
    # K-to-1) | lte = LTE only | onehot = one-hot label | z = random noise | cat_lte_z = cat(LTE, Z) |
    # sum_oh_z = one-hot + Z. Z ~ N(0, I) is drawn anew every iteration, as the noisy layers are re-initialized.
    input: str = "lte_nl"
    # cifar (32/64 px) | imagenet_reference (224 px, the reference's NLDeepGenerator, which produced the published
    # ImageNet numbers) | imagenet_paper (224 px, the supplementary Table 5 layout as docs/nayer-spec.md reads it)
    # | auto = imagenet_reference above 64 px, else cifar
    body: str = "auto"
    nz: int = 1000  # noisy-layer output width = generator input
    ngf: int = 64  # body width: 2 * ngf channels at the start, ngf at the end
    # paper Table 4: SpectralNorm convs + BN2d after the Sigmoid. The BN2d's output is taken as the teacher's
    # normalized input: G maps it back to pixels (x std + mean, clamped with a straight-through gradient), so the
    # buffer holds the images the teacher scored
    paper_variant: bool = False
    lr: float = 4e-3  # Adam on G (a fresh optimizer every synthesis iteration)
    beta1: float = 0.5  # Adam betas
    beta2: float = 0.999
    g_life: int = 10  # epochs between fresh generators
    noisy: NoisyConfig = field(default_factory=NoisyConfig)


@dataclass
class SynthesisConfig:
    batch_size: int = 400  # bs gen
    g_steps: int = 30  # g: generator steps per iteration
    g_loops: int = 2  # I: iterations per epoch
    warmup_loops: int = 10  # I during warm-up epochs
    a_bn: float = 10.0  # weight of L_BN (BN-statistics loss, paper Eq. 2)
    a_cls: float = 0.5  # weight of the teacher's CE on the target labels
    a_adv: float = 1.33  # weight of the adversarial term (after warm-up; 0 = off)
    bn_mmt: float = 0.9  # EMA momentum of the BN-statistics loss (0 = batch statistics only)
    # L_BN's per-layer distance (nayer.losses.BNStatisticsLoss): paper (raw L2 norms, summed: Eq. 2) | relative
    # (the paper's norms over the size of the running statistics, averaged; a_bn 30x the paper's) | normalized (in
    # the BN's own units per channel, averaged) | kl (per-channel Gaussian KL, averaged). The last three do not
    # depend on the teacher's activation scale, depth or width.
    bn_loss: str = "paper"
    # augment(x) before the teacher, in the reference's order: roll by up to `jitter` px + flip of the whole batch
    # (DeepInversion's jitter; ImageNet only), then a random crop after zero padding by crop_padding px (4 on every
    # dataset in the reference), then a per-image horizontal flip (CIFAR only)
    jitter: int = 0
    crop_padding: int = 4  # zero padding of the random crop, px
    flip: bool = True  # a per-image horizontal flip
    # The targets of an iteration's batch: balanced = [0..K-1] repeated, the remainder random (the reference's
    # CIFAR/Tiny K-to-1 batch) | slices = the K classes shuffled once per epoch, iteration i takes slice i of the
    # shuffle (the reference's ImageNet: 20 iterations x 50 cover the 1000 classes once per epoch)
    targets: str = "balanced"
    # The paper's synthesis metrics, logged per round (one extra teacher forward per kept batch): steps until the
    # teacher's CE falls below ce_threshold, diversity of teacher features against earlier images, IS.
    metrics: bool = True
    ce_threshold: float = 0.1  # CE convergence: steps until the teacher's CE on the batch is below this
    diversity_bank: int = 2000  # earlier images' features kept (reservoir sample) for the diversity metrics


@dataclass
class FMConfig:
    """FM (Fang et al., AAAI 2022, "Up to 100x faster data-free knowledge distillation"), reference script values."""

    nz: int = 256  # z ~ N(0, I), optimized with the generator's clone
    lr_g: float = 5e-3  # the clone's Adam; the meta generator's Adam uses lr_g * g_steps
    lr_z: float = 0.015  # Adam on z


@dataclass
class DeepInvConfig:
    """DeepInversion (Yin et al., CVPR 2020): pixels optimized directly."""

    lr: float = 0.1  # Adam on the (normalized) pixels, betas (0.5, 0.99)
    tv: float = 2.5e-5  # total-variation prior (sum of L2 norms of neighbour differences; DI's CIFAR value)
    l2: float = 0.0  # ||x||_2 prior
    js_temperature: float = 3.0  # the adversarial (competition) term: -JS(student || teacher) at T = 3
    jitter: int = 4  # roll by up to this many px (1/8 of 32, the reference's lim), then a batch flip


@dataclass
class KDConfig:
    batch_size: int = 512  # the global student batch (split evenly over the ranks on the pipeline)
    kd_steps: int = 400  # S: student steps per epoch
    lr: float = 0.2  # SGD (the reference's CIFAR value; the paper's text says 0.1)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    eta_min: float = 2e-4  # the cosine over the E student epochs ends here
    temperature: float = 20.0  # T of L_KD (paper Eq. 7)
    # KD augmentation of the buffer's images: pad = random crop after zero padding by crop_padding px (the
    # reference's CIFAR/Tiny transform) | resized = RandomResizedCrop (scale 0.08-1) back to the image size (the
    # reference's ImageNet transform, which its KD pool is read back through)
    crop: str = "pad"
    crop_padding: int = 4  # zero padding of crop=pad, px
    flip: bool = True  # and a random horizontal flip


@dataclass
class RunConfig:
    """One NAYER run: Algorithm 1 for `warmup` + `epochs` epochs (or until `time_budget_s`)."""

    # Keys a resumed run may set differently: how long, how it reacts to faults and how it reads its evaluation set,
    # never what it computes.
    RESUME_MAY_CHANGE: ClassVar[tuple[str, ...]] = ("resume", "time_budget_s", "on_nonfinite", "data.eval_workers",
                                                     "data.eval_cache")

    name: str = "nayer"  # the run folder is <out_dir>/<name>
    out_dir: str = "runs"
    seed: int = 0  # every random draw of the run follows from it
    epochs: int = 100  # E: epochs with student training, after warm-up
    warmup: int = 20  # epochs that synthesize only (no adversarial term, no student training)
    time_budget_s: float = 0.0  # stop after the epoch that crosses this wall-clock budget; 0 = no budget
    device: str = "auto"  # auto = cuda when present, else cpu
    num_threads: int = 0  # CPU threads for torch; 0 = torch's default
    bf16: bool = False  # bf16 autocast for G, teacher and student (2-2.5x on AMX CPUs; Ampere+ GPUs)
    compile: bool = False  # torch.compile the student and teacher forward passes
    channels_last: bool = True  # NHWC activations (4x faster narrow convs on CPU, tensor cores on GPU)
    resume: bool = False  # continue runs/<name> from its last checkpoint
    grid_classes: int = 10  # rows (classes) in the per-epoch sample grid
    grid_per_class: int = 8  # images per row of that grid
    # A NaN/inf generator or KD loss: stop = end the run naming the round and step (the last checkpoint stays
    # resumable); skip = leave that step out (no optimizer step), count it in metrics.jsonl and go on.
    on_nonfinite: str = "stop"
    method: str = "nayer"  # nayer | fm | deepinv (nayer.methods): the synthesizer; the KD loop is the same for all
    data: DataConfig = field(default_factory=DataConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    student: ModelConfig = field(default_factory=lambda: ModelConfig(arch="resnet20"))
    lte: LTEConfig = field(default_factory=LTEConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    fm: FMConfig = field(default_factory=FMConfig)
    deepinv: DeepInvConfig = field(default_factory=DeepInvConfig)

    def validate(self) -> None:
        """Cross-field checks the type system cannot express; each error names the value and what is allowed."""
        check_device_name(self.device)
        check_choice("on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES)
        for role, model in (("teacher", self.teacher), ("student", self.student)):
            try:
                check_arch(model.arch)
            except ValueError as error:
                raise ConfigError(f"{role}.arch={model.arch!r}: {error}") from None
        from nayer.methods import method_names  # the registry imports the methods, which import this module

        check_choice("method", self.method, method_names())
        check_choice("generator.input", self.generator.input, GENERATOR_INPUTS)
        check_choice("generator.body", self.generator.body, GENERATOR_BODIES)
        check_choice("generator.noisy.mode", self.generator.noisy.mode, NOISY_MODES)
        check_choice("generator.noisy.arch", self.generator.noisy.arch, tuple(NOISY_SHAPES))
        check_choice("lte.encoder", self.lte.encoder, ENCODERS)
        check_choice("synthesis.bn_loss", self.synthesis.bn_loss, BN_LOSS_FORMS)
        check_choice("synthesis.targets", self.synthesis.targets, TARGET_MODES)
        if self.synthesis.targets == "slices" and self.method != "nayer":
            raise ConfigError(f"synthesis.targets=slices is NAYER's label schedule; method={self.method} draws "
                              "uniform random targets: set synthesis.targets=balanced")
        check_choice("kd.crop", self.kd.crop, KD_CROPS)
        check_choice("lte.names", self.lte.names, PROMPT_NAMES)
        if self.data.eval_crop_pct is not None and not 0 < self.data.eval_crop_pct <= 1:
            raise ConfigError(f"data.eval_crop_pct must be in (0, 1] (0.875 = Resize 256 / CenterCrop 224), got "
                              f"{self.data.eval_crop_pct}")
        for key, value in [("epochs", self.epochs), ("warmup", self.warmup), ("synthesis.g_loops", self.synthesis.g_loops),
                           ("synthesis.warmup_loops", self.synthesis.warmup_loops), ("kd.kd_steps", self.kd.kd_steps),
                           ("data.eval_limit", self.data.eval_limit), ("data.eval_workers", self.data.eval_workers),
                           ("generator.g_life", self.generator.g_life - 1)]:
            if value < 0:
                raise ConfigError(f"{key} must be >= {0 if key != 'generator.g_life' else 1}, got {value}")
        for key, value in [("synthesis.batch_size", self.synthesis.batch_size), ("synthesis.g_steps", self.synthesis.g_steps),
                           ("kd.batch_size", self.kd.batch_size), ("generator.nz", self.generator.nz)]:
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        if self.synthesis.bn_mmt < 0 or self.synthesis.bn_mmt >= 1:
            raise ConfigError(f"synthesis.bn_mmt must be in [0, 1), got {self.synthesis.bn_mmt}")
        if self.time_budget_s < 0:
            raise ConfigError(f"time_budget_s must be >= 0 (0 = no budget), got {self.time_budget_s}")
        if self.kd.temperature <= 0:
            raise ConfigError(f"kd.temperature must be > 0, got {self.kd.temperature}")
        if self.epochs + self.warmup == 0:
            raise ConfigError("warmup + epochs is 0: nothing to run")


def check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")
