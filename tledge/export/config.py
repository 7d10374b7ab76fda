"""The export's options, nested by concern and validated in one place (``ExportConfig.validate``).

Budgets count images, layers and iterations, never seconds, so the same options give the same graphs on
a fast or slow, idle or busy machine.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from tledge.deploy.tledge_runtime.engine import DEFAULT_PROFILE
from tledge.errors import UsageError
from tledge.preprocess import INPUT_DTYPES, INPUT_KINDS

METHODS = ("minmax", "percentile", "entropy", "mse")
FORM_NAMES = ("tensorrt", "cpu")
BIAS_CORRECTION_MODES = ("auto", "analytic", "empirical", "off")
ESCALATION_MODES = ("auto", "on", "off")
# --centre: how the graph is centred (int8.quantize.centred_tensors), and auto: exact, or padded when exact misses
# --target-agreement (int8.plan). Config imports no ONNX code.
GRAPH_CENTRE_MODES = ("off", "exact", "padded")
CENTRE_MODES = (*GRAPH_CENTRE_MODES, "auto")
QAT_MODES = ("off", "on", "auto")
QAT_SCALES = ("fixed", "learned")


@dataclass(frozen=True)
class CalibConfig:
    source: str = "auto"            # auto | train | a folder of images (never the val split)
    count: int = 512                # at most this many calibration images
    method: str = "auto"            # auto (closest to FP32 on held-out calibration images) | one of METHODS
    percentile: float = 99.99
    judge_images: int = 128         # calibration images held out of every fit; they judge candidates


@dataclass(frozen=True)
class Int8Config:
    forms: tuple[str, ...] = FORM_NAMES
    cle: bool = True                    # cross-layer equalization (exact pairs only)
    bias_correction: str = "auto"       # auto: analytic and empirical made, the closer to FP32 on the judge kept
    head_refit: bool = True             # re-fit the linear head on INT8 features of training images
    refit_count: int = 2000             # training images for the head refit (stratified)
    # Weight of distillation from the FP32 logits (1 - it: the labels). 1 by default: the plan's aim is the FP32
    # model's answers. With empirical bias correction (mobilenet_v2, 224 px, 2,000 test images), the TensorRT
    # form agreed with FP32 on 94.1% without a refit, 94.05% refitted on labels (which moved top-1 +0.9 pt, away
    # from FP32: judge MSE 0.13 -> 0.28) and 94.9% distilled (judge MSE 0.10); CPU form 95.2 / 95.2 / 96.05%.
    # (With analytic correction, distilling had cost 0.55 pt of top-1.) The INT8 figure is also reported against
    # an FP32 model given the same refit (quantization alone; issue 15 item 9).
    refit_distill: float = 1.0
    # Centring of the TensorRT form's quantizers on ReLU6 outputs (quantize.centred_tensors): off | exact (those whose
    # readers need no padding: the graph gains no node) | padded (also those read by padded convolutions: the `pads`
    # graph pass moves such a convolution's padding into a Pad node in front of the quantizer, Clip -> Pad -> Q/DQ
    # -> Conv, EfficientNet-Lite's shape; device cost not measured) | auto (exact; padded as a second cheap recipe
    # when exact misses --target-agreement on the judge images, the one closer to FP32 kept: int8.plan). auto since
    # mobilenet_v2's TensorRT form reached 96% agreement only padded (96.51% at 224 px against 95.44% exact; README).
    centre: str = "auto"
    # Dropout on the features in the refit. None: the tune's head dropout x (1 - refit_distill), so 0 for the default
    # fully distilled refit, whose target is FP32's exact logits: with the tune's 0.2 the refit drifted even on FP32
    # features (val -0.4 pt mobilenet_v2 112 px, -0.9 pt efficientnet_lite0 112 px; 0.0 without), and
    # efficientnet_lite0 at 224 px failed the 1.0 pt gate (TensorRT form 1.20 pt on val) where without dropout it
    # lost 0.36 / 0.15 pt on the test images at 97.6 / 97.8% agreement (benchmarks/results/int8_plan_zen4_dropout_*).
    refit_dropout: float | None = None
    adaround: bool = True               # learned weight rounding allowed in the expensive recipe
    adaround_iters: int = 2000          # iterations per learned layer (AdaRound paper: ~10k at batch 32)
    adaround_layers: int = 16           # at most this many layers learned, the costliest first
    adaround_images: int = 64           # calibration images the rounding is learned on
    target_agreement: float = 0.96      # top-1 agreement with FP32 on the judge images that the cheap plan must
                                        # reach; below it the expensive passes run (--escalate auto)
    escalate: str = "auto"              # auto | on (always run the expensive passes) | off (never)
    qat: str = "off"                    # quantization-aware fine-tuning: off | on | auto (when the gate misses
                                        # --max-drop, before keeping quantizers in float)
    qat_steps: int = 300                # training steps (the budget counts steps, never seconds)
    qat_batch: int = 32
    qat_lr: float = 1e-5                # Adam, weights and biases (learned scales: 100 x this x their value);
                                        # linear warm-up over the first 20% of the steps, then cosine
    qat_scales: str = "fixed"           # fixed | learned (LSQ-style, from the calibrated ranges). Fixed since the PTQ
                                        # start has empirical bias correction, which is tuned to the calibrated grid:
                                        # at 64 px learned scales raised the TensorRT form's held-out KL at every
                                        # rate tried (6 settings), fixed ones lowered it (README, QAT)
    qat_patience: int = 5               # held-out checks (every steps/10) without improvement before stopping;
                                        # checks during the learning rate's warm-up do not count. It was 3, counted
                                        # from step 0: mobilenet_v2 112 px stopped at step 90 of 300 (warm-up to 60,
                                        # then the peak rate), where the same run to 300 found its best at step 210
    qat_ema: float = 0.0                # decay of an exponential moving average of the weights that the held-out
                                        # checks and the result use (0: off; the last step's weights)
    qat_seed: int = 0                   # seed of QAT's draws (held-out split, mixup, augmentation); 0 is the draws
                                        # every earlier release made
    qat_augment: bool = False           # shifts (up to 1/8 of the side, edge pixels repeated) and horizontal flips
                                        # of the distillation images before mixup, the FP32 teacher run on the same
                                        # images ("consistent" distillation, Beyer et al. 2022)
    qat_mix: float = 1.0                # mixup alpha of the distillation images (0: the training images as they are);
                                        # the FP32 teacher is run on every mixed batch. mobilenet_v2 112 px, TensorRT
                                        # form, 2,000 test images: logit MSE to FP32 0.18 (0) -> 0.154 (0.4) -> 0.132 (1.0)
    replay: str | None = None           # an earlier export's manifest whose decisions are taken instead of made
                                        # (int8/replay.py: the same choices on another CPU)


@dataclass(frozen=True)
class GateConfig:
    max_drop: float = 1.0               # top-1 points on val against PyTorch
    fallback: bool = True               # keep the most damaging quantizers in float to meet max_drop
    max_fallback_fraction: float = 0.25


@dataclass(frozen=True)
class EngineOptions:
    engine: str | None = None           # None | fp16 | int8 (explicit: fail without TensorRT)
    auto_engine: bool = True            # build engines for the asked precisions when TensorRT is here
    batch: tuple[int, int, int] = DEFAULT_PROFILE
    workspace_mib: int = 1024
    dla_core: int | None = None
    timing_cache: str | None = None


@dataclass(frozen=True)
class ExportConfig:
    fp16: bool = False
    int8: bool = False
    calib: CalibConfig = field(default_factory=CalibConfig)
    quant: Int8Config = field(default_factory=Int8Config)
    gate: GateConfig = field(default_factory=GateConfig)
    engine: EngineOptions = field(default_factory=EngineOptions)
    opset: int = 17
    simplify: bool = False
    threads: int | None = None          # CPU threads for onnxruntime and torch (results do not depend on it)
    fp32_tol: float = 1e-3
    input: str = "normalized"           # normalized | raw (0-255 RGB; the graphs normalise as their first ops)
    input_dtype: str = "float32"        # raw input only: float32 | uint8

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> "ExportConfig":
        """Refuse bad options before any work, each with the valid choices."""
        c, q, g, e = self.calib, self.quant, self.gate, self.engine
        for f in q.forms:
            if f not in FORM_NAMES:
                raise UsageError(f"unknown INT8 form '{f}'; choices: {', '.join(FORM_NAMES)}.",
                                 "pass --form tensorrt or cpu.")
        if c.method != "auto" and c.method not in METHODS:
            raise UsageError(f"unknown calibration method '{c.method}'; choices: auto, {', '.join(METHODS)}.",
                             "pass one of them to --method.")
        if not 0 < c.percentile <= 100:
            raise UsageError(f"--percentile {c.percentile} is not in (0, 100].", "pass e.g. 99.99.")
        if c.count < 1 or c.judge_images < 1:
            raise UsageError(f"--calib-count {c.count} / judge images {c.judge_images} must be at least 1.",
                             "pass a positive number of images.")
        if q.bias_correction not in BIAS_CORRECTION_MODES:
            raise UsageError(f"unknown bias correction mode '{q.bias_correction}'; choices: "
                             f"{', '.join(BIAS_CORRECTION_MODES)}.", "pass one of them to --bias-correction.")
        if q.escalate not in ESCALATION_MODES:
            raise UsageError(f"unknown --escalate mode '{q.escalate}'; choices: {', '.join(ESCALATION_MODES)}.",
                             "pass one of them to --escalate.")
        if q.centre not in CENTRE_MODES:
            raise UsageError(f"unknown --centre mode '{q.centre}'; choices: {', '.join(CENTRE_MODES)}.",
                             "pass one of them to --centre.")
        if q.refit_dropout is not None and not 0.0 <= q.refit_dropout < 1.0:
            raise UsageError(f"--refit-dropout {q.refit_dropout} is not a dropout rate in [0, 1).",
                             "pass e.g. --refit-dropout 0.")
        if not 0.0 <= q.refit_distill <= 1.0:
            raise UsageError(f"--refit-distill {q.refit_distill} is not a weight between 0 and 1.",
                             "pass 0 (labels only) to 1 (FP32 logits only).")
        for name, v in (("--adaround-iters", q.adaround_iters), ("--adaround-layers", q.adaround_layers),
                        ("adaround images", q.adaround_images),
                        ("--refit-count", q.refit_count)):
            if v < 1:
                raise UsageError(f"{name} {v} is not a positive count.",
                                 "pass a positive number (budgets count iterations, layers and images).")
        if q.qat not in QAT_MODES or q.qat_scales not in QAT_SCALES:
            raise UsageError(f"--qat {q.qat} / --qat-scales {q.qat_scales}: choices {', '.join(QAT_MODES)} / "
                             f"{', '.join(QAT_SCALES)}.", "pass e.g. --qat on --qat-scales fixed.")
        if q.qat != "off" and not (self.int8 or self.engine.engine == "int8"):
            raise UsageError(f"--qat {q.qat} fine-tunes the INT8 graphs, but no INT8 export was asked for.",
                             "add --int8 (e.g. `tledge export RUN --int8 --qat on`).")
        if q.replay is not None and not (self.int8 or self.engine.engine == "int8"):
            raise UsageError(f"--replay {q.replay} replays an INT8 export's decisions, but no INT8 export was asked for.",
                             "add --int8 (e.g. `tledge export RUN --int8 --replay OTHER/export_manifest.json`).")
        for name, v in (("--qat-steps", q.qat_steps), ("--qat-batch", q.qat_batch), ("--qat-patience", q.qat_patience)):
            if v < 1:
                raise UsageError(f"{name} {v} is not a positive count.", f"pass {name} 1 or more.")
        if not q.qat_mix >= 0:
            raise UsageError(f"--qat-mix {q.qat_mix} is not a mixup alpha (0 or more).", "pass e.g. --qat-mix 1.0, or 0 "
                             "to distil on the training images as they are.")
        if q.qat_seed < 0:
            raise UsageError(f"--qat-seed {q.qat_seed} is not a seed (0 or more).", "pass e.g. --qat-seed 1.")
        if not 0.0 <= q.qat_ema < 1.0:
            raise UsageError(f"--qat-ema {q.qat_ema} is not a moving-average decay in [0, 1).",
                             "pass e.g. --qat-ema 0.98, or 0 to keep the last step's weights.")
        if not q.qat_lr > 0:
            raise UsageError(f"--qat-lr {q.qat_lr} is not a positive learning rate.", "pass e.g. --qat-lr 1e-5.")
        if not 0.0 < q.target_agreement <= 1.0:
            raise UsageError(f"--target-agreement {q.target_agreement} is not in (0, 1].", "pass e.g. 0.97.")
        if g.max_drop < 0 or not 0 < g.max_fallback_fraction <= 1:
            raise UsageError(f"--max-drop {g.max_drop} must be >= 0 and the fallback fraction in (0, 1].",
                             "pass e.g. --max-drop 1.0.")
        if e.engine not in (None, "fp16", "int8"):
            raise UsageError(f"unknown engine precision '{e.engine}'; choices: fp16, int8.", "pass --engine fp16 or int8.")
        if self.input not in INPUT_KINDS:
            raise UsageError(f"unknown --input '{self.input}'; choices: {', '.join(INPUT_KINDS)}.",
                             "pass --input normalized or --input raw.")
        if self.input_dtype not in INPUT_DTYPES[self.input]:
            raise UsageError(f"--input-dtype {self.input_dtype} needs --input raw (normalized input is float32).",
                             "pass --input raw --input-dtype uint8, or drop --input-dtype.")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads {self.threads} is not a positive count.", "pass e.g. --threads 2.")
        return self
