"""NAYER's generator: fixed label-text embeddings -> persistent BN1d -> noisy layers -> conv body -> image.

The noisy layers are the paper's key idea (Sec. 3.2): a Linear from the embedding to the generator input that
is re-initialized (weight ~ N(0,1), bias 0) at the start of every synthesis iteration, so the same few label
embeddings yield diverse images without a random-noise input. In `k_to_1` mode (the reference's) the batch is
cut into chunks of K targets (one per class) and chunk i goes through its own layer; in `one_to_one` every
image has its own layer. All layers of an iteration are held as one stacked weight so the forward is a single
batched matmul instead of a Python loop over ceil(B/K) modules.

Noisy-layer shapes of supplementary Table 5 (`generator.noisy.arch`); "BN" is the persistent BatchNorm1d on
the embeddings (part of G, trained, kept across iterations), everything after it is re-initialized:
A1 Linear | A2 Linear, Linear | A3 BN, Linear (reference, best) | A4 BN, Linear, Linear |
A5 BN, Linear, Sigmoid | A6 BN, Linear, Tanh | A7 BN, Linear, ReLU | A8 BN, Linear, Dropout.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nayer.augment import Normalize
from nayer.specs import ImageSpec

if TYPE_CHECKING:
    from nayer.config import GeneratorConfig, NoisyConfig

NOISY_SHAPES: dict[str, tuple[bool, int, str]] = {
    # arch: (embedding BN1d, number of stacked Linears, activation after the last Linear)
    "A1": (False, 1, "none"),
    "A2": (False, 2, "none"),
    "A3": (True, 1, "none"),
    "A4": (True, 2, "none"),
    "A5": (True, 1, "sigmoid"),
    "A6": (True, 1, "tanh"),
    "A7": (True, 1, "relu"),
    "A8": (True, 1, "dropout"),
}
NOISY_MODES = ("k_to_1", "one_to_one")  # one layer per chunk of K targets | one layer per image
# What G is fed instead of LTE -> noisy layer (lte_nl), and its width: paper Fig. 5, supplementary B.4
GENERATOR_INPUTS = ("lte_nl", "lte", "onehot", "z", "cat_lte_z", "sum_oh_z")


def balanced_targets(batch_size: int, num_classes: int, generator: torch.Generator | None = None) -> Tensor:
    """[0..K-1] repeated batch_size//K times, then batch_size%K random labels (the reference's K-to-1 batch)."""
    reps = torch.arange(num_classes).repeat(batch_size // num_classes)
    extra = torch.randint(0, num_classes, (batch_size % num_classes,), generator=generator)
    return torch.cat([reps, extra])


def class_slice_targets(batch_size: int, num_classes: int, seed: int, epoch: int, iteration: int) -> Tensor:
    """Iteration `iteration`'s slice of epoch `epoch`'s shuffle of the K classes (the reference's ImageNet
    `generate_ys_in`): positions [i*B, (i+1)*B) of the permutation, wrapping around past K. The shuffle depends on
    (seed, epoch) only, so workers that split an epoch's iterations agree on it."""
    perm = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[(torch.arange(batch_size) + iteration * batch_size) % num_classes]


class NoisyLayers(nn.Module):
    """Independent Linear stacks, applied chunk-wise (`cfg.mode`: a chunk of K targets, or one image, per stack),
    shaped as `cfg.arch` says after its BN1d; re-initialized by :meth:`reinit`."""

    def __init__(self, cfg: "NoisyConfig", *, in_dim: int, out_dim: int, num_classes: int, batch_size: int):
        super().__init__()
        _, depth, self.activation = NOISY_SHAPES[cfg.arch]
        self.chunk = num_classes if cfg.mode == "k_to_1" else 1
        self.num_layers = n = math.ceil(batch_size / self.chunk)
        dims = [in_dim] + [out_dim] * depth
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(n, a, b)) for a, b in zip(dims, dims[1:]))
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(n, 1, b)) for b in dims[1:])
        self.reinit()

    @torch.no_grad()
    def reinit(self) -> None:
        """weight ~ N(0, 1), bias = 0, as the reference's `re_init_le`."""
        for w in self.weights:
            w.normal_(0.0, 1.0)
        for b in self.biases:
            b.zero_()

    def forward(self, e: Tensor) -> Tensor:
        n = e.shape[0]
        if n > self.num_layers * self.chunk:
            raise ValueError(f"batch of {n} needs more than the {self.num_layers} noisy layers of {self.chunk} rows")
        used = math.ceil(n / self.chunk)
        padded = F.pad(e, (0, 0, 0, used * self.chunk - n)).view(used, self.chunk, -1)
        h = padded
        for w, b in zip(self.weights, self.biases):
            h = torch.baddbmm(b[:used], h, w[:used])
        if self.activation == "sigmoid":
            h = torch.sigmoid(h)
        elif self.activation == "tanh":
            h = torch.tanh(h)
        elif self.activation == "relu":
            h = torch.relu(h)
        elif self.activation == "dropout":
            h = F.dropout(h, 0.5, self.training)
        return h.reshape(used * self.chunk, -1)[:n]


def _conv(cin: int, cout: int, spectral: bool, bias: bool = False) -> nn.Module:
    conv = nn.Conv2d(cin, cout, 3, stride=1, padding=1, bias=bias)
    return nn.utils.parametrizations.spectral_norm(conv) if spectral else conv


class PixelsFromNormalized(nn.Module):
    """x * std + mean, clamped to [0, 1] with a straight-through gradient: the paper variant's BN2d output is the
    teacher's normalized input, and this gives the pixels whose normalization it is (what the buffer stores)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)

    def forward(self, x: Tensor) -> Tensor:
        pixels = self.normalize.invert(x)
        return pixels + (pixels.clamp(0, 1) - pixels).detach()


def _image_head(cin: int, paper_variant: bool, mean: Sequence[float] | None, std: Sequence[float] | None
                ) -> list[nn.Module]:
    """Conv3x3 -> 3, Sigmoid; the paper variant adds BN2d(3) and maps its output back to pixels."""
    layers: list[nn.Module] = [_conv(cin, 3, paper_variant, bias=True), nn.Sigmoid()]
    if paper_variant:
        if mean is None or std is None:
            raise ValueError("generator.paper_variant needs the teacher's mean and std")
        layers += [nn.BatchNorm2d(3, affine=False), PixelsFromNormalized(mean, std)]
    return layers


def _stage(cin: int, cout: int, spectral: bool, upsample: bool = True) -> list[nn.Module]:
    """(Up x2,) Conv3x3 (no bias), BN2d, LeakyReLU(0.2)."""
    return ([nn.Upsample(scale_factor=2)] if upsample else []) + \
        [_conv(cin, cout, spectral), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True)]


class Body(nn.Module):
    """Linear(nz -> c0 x s x s), reshape, `conv_blocks` (set by the subclass after this, so that the Linear draws
    its initial weights first, as in the reference)."""

    conv_blocks: nn.Sequential

    def __init__(self, nz: int, channels: int, image_size: int, factor: int, name: str):
        super().__init__()
        if image_size % factor:
            raise ValueError(f"the {name} generator body needs an image size divisible by {factor}, got {image_size}")
        self.init_size = image_size // factor
        self.l1 = nn.Linear(nz, channels * self.init_size ** 2)

    def forward(self, z: Tensor) -> Tensor:
        out = self.l1(z).view(z.shape[0], -1, self.init_size, self.init_size)
        return self.conv_blocks(out)


class CifarBody(Body):
    """Fast-DFKD/NAYER generator body for 32/64 px (the reference's NLGenerator): Linear -> 128 x (s/4)^2, BN2d,
    two (Up, conv, BN, LeakyReLU) stages 128/64, conv, sigmoid."""

    def __init__(self, nz: int, ngf: int, image_size: int, paper_variant: bool,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__(nz, ngf * 2, image_size, 4, "cifar")
        self.conv_blocks = nn.Sequential(nn.BatchNorm2d(ngf * 2), *_stage(ngf * 2, ngf * 2, paper_variant),
                                         *_stage(ngf * 2, ngf, paper_variant), *_image_head(ngf, paper_variant, mean, std))


class ImageNetPaperBody(Body):
    """224 px, the supplementary Table 5 layout as docs/nayer-spec.md reads it: Linear -> 128 x 14x14, BN2d, four
    (Up x2, conv3x3, BN, LeakyReLU) stages 128/128/64/64, conv, sigmoid."""

    def __init__(self, nz: int, ngf: int, image_size: int, paper_variant: bool,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__(nz, ngf * 2, image_size, 16, "imagenet_paper")
        widths = [ngf * 2, ngf * 2, ngf * 2, ngf, ngf]
        blocks: list[nn.Module] = [nn.BatchNorm2d(widths[0])]
        for cin, cout in zip(widths, widths[1:]):
            blocks += _stage(cin, cout, paper_variant)
        self.conv_blocks = nn.Sequential(*blocks, *_image_head(widths[-1], paper_variant, mean, std))


class ImageNetReferenceBody(Body):
    """224 px, the reference's NLDeepGenerator (what its ImageNet runs used): Linear -> 128 x 14x14 with no BN2d,
    a (conv3x3, BN, LeakyReLU) stage at 14 px, then four (Up x2, ...) stages 128/64/64/64, conv, sigmoid."""

    def __init__(self, nz: int, ngf: int, image_size: int, paper_variant: bool,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__(nz, ngf * 2, image_size, 16, "imagenet_reference")
        blocks = _stage(ngf * 2, ngf * 2, paper_variant, upsample=False)
        for cin, cout in ((ngf * 2, ngf * 2), (ngf * 2, ngf), (ngf, ngf), (ngf, ngf)):
            blocks += _stage(cin, cout, paper_variant)
        self.conv_blocks = nn.Sequential(*blocks, *_image_head(ngf, paper_variant, mean, std))


BODIES = {"cifar": CifarBody, "imagenet_reference": ImageNetReferenceBody, "imagenet_paper": ImageNetPaperBody}
GENERATOR_BODIES = ("auto", *BODIES)  # auto: the reference's ImageNet body above 64 px, else cifar


def make_body(cfg: "GeneratorConfig", *, nz: int, images: ImageSpec) -> nn.Module:
    """The conv body `cfg.body` (width `cfg.ngf`, the paper variant if `cfg.paper_variant`) for `images.size` px,
    fed an `nz`-wide vector; the paper variant maps its output back to pixels with the images' mean and std."""
    body = cfg.body
    if body == "auto":
        body = "imagenet_reference" if images.size > 64 else "cifar"
    return BODIES[body](nz, cfg.ngf, images.size, cfg.paper_variant, images.mean, images.std)


class NayerGenerator(nn.Module):
    """G(y) = body(noisy(BN1d(LTE[y]))). The embeddings are a fixed buffer (no grad), as in the reference.

    `input` selects the generator-input ablations of paper Fig. 5 / supplementary B.4 instead of the noisy layer:
    `lte` BN1d(LTE[y]), `onehot` BN1d(onehot(y)), `z` BN1d(Z), `cat_lte_z` BN1d(cat(LTE[y], Z)) and `sum_oh_z`
    BN1d(onehot(y) + Z), each fed straight to the body; Z ~ N(0, I) (width nz, K for sum_oh_z) is drawn anew at
    every :meth:`reinit_noisy`, i.e. every synthesis iteration, the way the noisy layers are re-initialized."""

    def __init__(self, cfg: "GeneratorConfig", *, embeddings: Tensor, batch_size: int, images: ImageSpec):
        super().__init__()
        if embeddings.ndim != 2 or embeddings.shape[0] != images.num_classes:
            raise ValueError(f"label embeddings must be [{images.num_classes} classes, dim], got shape "
                             f"{tuple(embeddings.shape)}")
        num_classes, emb_dim = embeddings.shape
        nz, self.input, self.num_classes = cfg.nz, cfg.input, num_classes
        self.register_buffer("embeddings", embeddings.detach().float().clone())
        z_dim = {"z": nz, "cat_lte_z": nz, "sum_oh_z": num_classes}.get(cfg.input, 0)
        self.register_buffer("z", torch.zeros(batch_size, z_dim), persistent=False)
        self.noisy: NoisyLayers | None = None
        if cfg.input == "lte_nl":
            self.emb_bn = nn.BatchNorm1d(emb_dim) if NOISY_SHAPES[cfg.noisy.arch][0] else nn.Identity()
            self.noisy = NoisyLayers(cfg.noisy, in_dim=emb_dim, out_dim=nz, num_classes=num_classes,
                                     batch_size=batch_size)
            body_in = nz
        else:
            body_in = {"lte": emb_dim, "onehot": num_classes, "z": nz, "cat_lte_z": emb_dim + nz,
                       "sum_oh_z": num_classes}[cfg.input]
            self.emb_bn = nn.BatchNorm1d(body_in)
        self.body = make_body(cfg, nz=body_in, images=images)

    @torch.no_grad()
    def reinit_noisy(self) -> None:
        """A new iteration's randomness: the noisy layers re-initialized, or a fresh Z."""
        if self.noisy is not None:
            self.noisy.reinit()
        if self.z.numel():
            self.z.normal_()

    def forward(self, targets: Tensor) -> Tensor:
        n = targets.shape[0]
        if self.input in ("lte_nl", "lte"):
            e = self.embeddings[targets]
        elif self.input == "onehot":
            e = F.one_hot(targets, self.num_classes).float()
        elif self.input == "z":
            e = self.z[:n]
        elif self.input == "cat_lte_z":
            e = torch.cat([self.embeddings[targets], self.z[:n]], dim=1)
        else:  # sum_oh_z
            e = F.one_hot(targets, self.num_classes).float() + self.z[:n]
        e = self.emb_bn(e)
        return self.body(self.noisy(e) if self.noisy is not None else e)
