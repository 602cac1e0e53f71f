"""Data-free quantization (NAYER paper Table 3): PTQ calibrated on NAYER's synthetic images, then recovery by
distilling the float model into its fake-quantized copy (data-free QAT by KD) on those same images only.

    python -m nayer.quantize config=configs/quantize/cifar10_w4a8.yaml buffer=runs/<run>/buffer   # more: --help

Pure PyTorch: FX graph mode quantization from ``torch.ao.quantization`` (``prepare_qat_fx`` with a custom
``QConfigMapping``); every bit width is *simulated* with ``FakeQuantize`` modules (there are no int4/int6 CPU
kernels), so the numbers are those of an integer model with these grids, evaluated in float arithmetic.

What is quantized, and how (:func:`nayer.quantize.fx.quantize_model`):

- Weights: symmetric, ``qint8`` storage with ``quant_min, quant_max = -2^(b-1), 2^(b-1) - 1`` (2^b levels, zero
  point 0), per output channel by default (``per_channel=false``: one scale per tensor). Observer: min/max of the
  weights (``MovingAverage*MinMaxObserver``; weights do not change during calibration, so it is their exact
  min/max).
- BatchNorm is folded: FX fuses every conv + BN (+ ReLU) into a ``ConvBn(ReLU)2d`` QAT module, which fake-quantizes
  ``W * gamma / sqrt(running_var + eps)``, the weight a deployed integer conv would hold.
- Activations: affine, ``quint8`` storage with ``0 .. 2^a - 1``, per tensor, at every point FX observes: the
  network input, each fused conv(+BN+ReLU) output, each residual add + ReLU, the logits. Observer ``act_observer``:
  ``minmax`` (global min/max over the calibration batches, the default), ``moving_average`` (EMA of batch
  min/max, constant 0.01) or ``histogram`` (PyTorch's L2-optimal histogram search, with its target grid set to
  the 2^a levels actually used).
- First and last layers, ``first_last`` (data-free quantization papers, e.g. Genie and Qimera, follow BRECQ and
  keep them at 8 bits): ``8bit`` (default) = the first conv's weights and its input (the image) and the last
  Linear's weights, its input (the pooled features; the tensor before pooling, since FX shares the observer
  across pooling and flatten) and its output (logits) at 8 bits; the first conv's *output* follows ``a_bits``.
  ``same`` = everything at w_bits / a_bits. ``float`` = the first conv and the last Linear are not quantized:
  float weights, the float image into the first conv, float features into the last Linear and float logits out
  (the first conv's output is still quantized at a_bits, as the next layer's input).

Phases (:func:`nayer.quantize.runner.run`): (1) float top-1; (2) PTQ: observers on, fake quant off,
``calib.batches`` batches of the synthetic images through the model in eval mode (BN uses the teacher's running statistics), un-augmented by
default (``calib.augment=true``: crop + flip as in KD), then observers frozen and fake quant on, evaluate;
(3) recovery: SGD on the KD loss (paper Eq. 7, T = ``qat.temperature``) between the float model and the PTQ model
on augmented synthetic images, cosine learning rate per step, BN statistics frozen from ``qat.freeze_bn_step`` and
observers (re-enabled for QAT) frozen from ``qat.freeze_observer_step`` (default 0: the calibrated ranges stay),
evaluate. The float model is never modified (the quantized model is a deep copy).

Synthetic images: the single-process runner's buffer, ``<run>/buffer/chunk-*.pt`` files of
``{"images": uint8 [N,3,H,W], "labels": int64 [N]}`` (``buffer=`` may also name the run folder), or, through
``python -m orchestrator.quantize``, the pipeline's WebDataset shards, each checked against its manifest sha256.

Modules: ``config`` (the schema), ``fx`` (FX fake quantization, calibration), ``qat`` (recovery by KD), ``runner``
(the run, any buffer reader), ``app`` (its command line).
"""


from nayer.quantize.config import CalibConfig, QATConfig, QuantizeConfig
from nayer.quantize.fx import calibrate, fake_quant_weights, qconfig_mapping, quantize_model
from nayer.quantize.qat import QATTrainer
from nayer.quantize.runner import load_buffer, read_chunks, run

__all__ = ["CalibConfig", "QATConfig", "QuantizeConfig", "QATTrainer", "calibrate", "fake_quant_weights",
           "load_buffer", "qconfig_mapping", "quantize_model", "read_chunks", "run"]
