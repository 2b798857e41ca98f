"""Option schemas shared by ``test.py`` and ``train.py`` (BasicSR key names where BasicSR has one)."""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional

from condiquant.config import ConfigError

WindowPad = Literal["none", "flip_next", "flip_plus_one", "reflect_next"]


@dataclass
class DatasetOptions:
    """One paired benchmark: HR folder, LR folder (generated MATLAB-exactly when absent)."""

    name: str
    dataroot_gt: str
    # Default: <dataroot_gt>/../LR_bicubic/X{scale}, the EDSR/2DQuant benchmark layout.
    dataroot_lq: Optional[str] = None
    # LR file stem from the HR stem; '{}x4' for the official benchmark files. {scale} is filled in too.
    filename_tmpl: str = "{}x{scale}"
    # Make missing LR files from HR with MATLAB-exact bicubic (cached in dataroot_lq).
    generate_lq: bool = True


@dataclass
class PathOptions:
    pretrain_network_g: Optional[str] = None
    # 'auto': params_ema if present, else params, else the file is a plain state dict.
    param_key_g: str = "auto"
    strict_load_g: bool = True


@dataclass
class ValOptions:
    save_img: bool = False
    suffix: Optional[str] = None
    crop_border: Optional[int] = None  # None: the scale, as in every SR table
    test_y_channel: bool = True
    # How LR images are padded to a multiple of the model's window before inference (PSNR depends on it):
    # none: the network's own handling; flip_next: flip-concatenate to the next multiple (2DQuant);
    # flip_plus_one: flip-concatenate to (h // w + 1) * w (official SwinIR test script);
    # reflect_next: reflect-pad to the next multiple (BasicSR SwinIRModel).
    window_pad: WindowPad = "none"
    tile: int = 0  # LR tile size for large images; 0 = whole image
    tile_overlap: int = 32

    def validate(self, where: str) -> None:
        if self.tile < 0 or self.tile_overlap < 0:
            raise ConfigError(f"{where}.tile: tile and tile_overlap must be >= 0")
        if self.tile and self.tile_overlap >= self.tile:
            raise ConfigError(f"{where}.tile_overlap: must be smaller than tile ({self.tile})")


@dataclass
class TestOptions:
    """``python test.py -opt options/test.yml``."""

    name: str
    scale: int
    network_g: Dict[str, Any]
    datasets: Dict[str, DatasetOptions]
    path: PathOptions = field(default_factory=PathOptions)
    val: ValOptions = field(default_factory=ValOptions)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    # Key of condiquant/references.yml whose published numbers are printed beside ours.
    reference: Optional[str] = None
    # Modules whose outputs are replaced by zeros: an ablation, e.g. the residual branch of the long skip (what a
    # model whose body contributes nothing scores).
    zero_outputs: List[str] = field(default_factory=list)

    def validate(self, where: str) -> None:
        check_model_options(self, where)
        if not self.datasets:
            raise ConfigError(f"{where} datasets: at least one dataset is required")


def check_model_options(opts: Any, where: str) -> None:
    """Keys train.py and test.py share: scale, the network's type and upscale, threads."""
    if opts.scale < 1:
        raise ConfigError(f"{where} scale: must be a positive integer, got {opts.scale}")
    if "type" not in opts.network_g:
        raise ConfigError(f"{where} network_g.type: required key is missing")
    upscale = opts.network_g.get("upscale")
    if upscale is not None and upscale != opts.scale:
        raise ConfigError(f"{where} network_g.upscale: {upscale} differs from scale {opts.scale}")
    if opts.num_threads < 0:
        raise ConfigError(f"{where} num_threads: must be >= 0 (0: torch's default), got {opts.num_threads}")


QuantTarget = Literal["Linear", "Conv2d", "MatMul"]
ObserverName = Literal["minmax", "percentile", "dobi"]


@dataclass
class PlacementOptions:
    """Where quantizers go. Unset fields take the arch's preset (``condiquant/quant/presets.py``).

    Patterns: ``*`` matches one dotted name component, ``**`` any number (``layers.*`` = the RSTBs).
    """

    targets: Optional[List[QuantTarget]] = None  # module types that get quantizers
    include: Optional[List[str]] = None  # module names considered
    skip: Optional[List[str]] = None  # kept full precision
    high_precision: Optional[List[str]] = None  # quantized at high_precision_bit (e.g. first/last layers)
    high_precision_bit: int = 8
    split_qkv: Optional[List[str]] = None  # Linear layers quantized as 3 output chunks (q, k, v)
    # Quantizer-name patterns searched one-directionally by DOBI (post-softmax / post-GELU inputs).
    one_direction: Optional[List[str]] = None
    # Quantizer-name patterns of post-softmax maps (the quantizer ``quant.softmax_quantizer`` picks for them).
    post_softmax: Optional[List[str]] = None
    # Block outputs compared by the feature losses (DQC / SAFT).
    feature_modules: Optional[List[str]] = None


@dataclass
class DualRegionOptions:
    """OAQ's dual-region activation quantizer (``condiquant/quant/dual_region.py``)."""

    # paper: 2^(b-1)-1 dense + 2 x (2^(b-2)-1) tail levels; code: released OAQ-SR, 2^b dense + 2 x 2^(b-1) tail
    levels: Literal["paper", "code"] = "paper"
    bp_percentile: float = 99.0  # initial breakpoint: this percentile of the calibration activations
    # pooled: exact min/max and the |x| percentile over all calibration batches; code: the released code's EMA
    # (0.9) of per-batch min/max and the signed percentile of the last batch (quant/dual_region.py)
    init: Literal["pooled", "code"] = "pooled"

    def validate(self, where: str) -> None:
        if not 0.0 < self.bp_percentile < 100.0:
            raise ConfigError(f"{where}.bp_percentile: must be in (0, 100), got {self.bp_percentile}")


@dataclass
class QuantOptions:
    w_bit: int
    a_bit: int
    w_granularity: Literal["tensor", "channel"] = "tensor"
    # weights on grids centred on an exact zero (quant/quantizer.py SymmetricQuantizer): int8 codes with zero point
    # 0, which ONNX Runtime's fast symmetric convolution kernels need (scripts/bench_deploy.py)
    w_symmetric: bool = False
    placement: PlacementOptions = field(default_factory=PlacementOptions)
    # Quantizer of Linear/Conv2d inputs (MatMul inputs and weights stay uniform).
    a_quantizer: Literal["uniform", "dual_region"] = "uniform"
    dual_region: DualRegionOptions = field(default_factory=DualRegionOptions)
    # Quantizer of the post-softmax maps (``placement.post_softmax``): uniform, RepQ-ViT's log√2 (quant/log2.py) or
    # PTQ4ViT's twin-uniform (quant/twin.py)
    softmax_quantizer: Literal["uniform", "log2", "twin"] = "uniform"
    # Quantizer of the Linear/Conv2d inputs that ``placement.one_direction`` names (post-GELU / post-Swish):
    # uniform, or PTQ4ViT's twin-uniform
    post_act_quantizer: Literal["uniform", "twin"] = "uniform"
    # NoisyQuant's fixed noisy bias on the inputs of quantized Linear/Conv2d layers (set by method: noisyquant)
    noisy_bias: bool = False
    # CompSRT's in-quantizer Hadamard transform and scalar decomposition on every quantizer (quant/hadamard.py;
    # method: compsrt); not integer-deployable
    hadamard: bool = False
    # its integer codes: unclamped (the released code: a trained alpha opens more than 2^b codes) or clamped to the
    # 2^b codes 0 .. 2^b - 1 (a true b-bit grid; the rotation is still inside the quantizer)
    hadamard_codes: Literal["unclamped", "clamped"] = "unclamped"

    def validate(self, where: str) -> None:
        from condiquant.quant.quantizer import SUPPORTED_BITS

        for key in ("w_bit", "a_bit"):
            if getattr(self, key) not in SUPPORTED_BITS:
                raise ConfigError(f"{where}.{key}: unsupported bit-width {getattr(self, key)} "
                                  f"(supported: {', '.join(map(str, SUPPORTED_BITS))})")
        if self.post_act_quantizer == "twin" and self.a_quantizer != "uniform":
            raise ConfigError(f"{where}.post_act_quantizer: twin needs a_quantizer 'uniform'")
        if self.hadamard and (self.a_quantizer, self.softmax_quantizer, self.post_act_quantizer) != ("uniform",) * 3:
            raise ConfigError(f"{where}.hadamard: needs uniform a_quantizer, softmax_quantizer and post_act_quantizer")
        if self.hadamard and self.w_symmetric:
            raise ConfigError(f"{where}.w_symmetric: CompSRT's Hadamard quantizers (hadamard: true) have their own grid")
        if self.hadamard_codes == "clamped" and not self.hadamard:
            raise ConfigError(f"{where}.hadamard_codes: clamped needs hadamard: true")


@dataclass
class CalibOptions:
    """Calibration data: seeded LR crops of the calibration images; never a test set."""

    roots: List[str] = field(default_factory=lambda: ["datasets/calib/T91", "datasets/calib/BSD200"])
    # images held out for validation (split by image): 28 of the 141 T91+BSD200 images, enough that the seed spread
    # of a method is not hidden by the spread of a handful of crops
    val_fraction: float = 0.2
    split_seed: int = 0
    num_patches: int = 32  # bound-initialisation batch (2DQuant: 32 LR crops of 64x64)
    patch_size: int = 64
    chunk_size: int = 8  # patches per forward during bound initialisation (memory)
    seed: Optional[int] = None  # crops of calibration and conditioning; None: manual_seed
    val_patch_size: int = 96  # LR centre crop of each validation image


@dataclass
class BoundInitOptions:
    # Settings of the observer the method uses (minmax / percentile / dobi / dbdc).
    percentile: float = 99.99
    dobi_steps: int = 100
    max_samples: int = 1 << 20  # per-quantizer value sample for percentile/DOBI (exact min/max always)
    density_ratio: float = 1e-4  # dbdc (PTQ4SR's density-based dual clipping): share of the values clipped
    density_ratio_8bit: float = 1e-5  # ... at 8 bits (the released code's values)
    # after the bounds: each weight-quantized layer's bias absorbs the mean output shift of its weight quantization
    # (empirical bias correction, Nagel et al. 2019; transforms/bias_correction.py); methods: BIAS_CORRECTED
    bias_correction: bool = False


@dataclass
class LoopOptions:
    """The shared training loop (``condiquant/engine/loop.py``): DQC, SAFT and reconstruction set these."""

    total_iter: int = 300  # updates (one batch each)
    batch_size: int = 4
    patch_size: int = 48
    lr: float = 1e-2
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    # absolute: one Adam lr for every bound (the papers); range: each element's step is scaled by its quantizer's
    # initial range (u - l), i.e. Adam on bounds in units of their range (lr then is a fraction of the range)
    lr_scale: Literal["absolute", "range"] = "absolute"
    # lr of the activation quantizers' parameters, if not ``lr`` (with lr_scale: range the paper's absolute lr on
    # IMDN's scales amounts to ~2e-2 of a weight range and ~4e-3 of an activation range per step)
    act_lr: Optional[float] = None
    warmup_iter: int = 0  # linear lr warm-up
    ema_decay: float = 0.0  # > 0: validate, checkpoint and keep the exponential moving average of the parameters
    augment: bool = True
    print_freq: int = 20
    val_freq: int = 100  # PSNR on the calibration validation split
    save_checkpoint_freq: int = 100
    select: Literal["last", "best_val"] = "last"  # best_val: the checkpoint with the best validation PSNR

    def validate(self, where: str) -> None:
        if self.total_iter < 1 or self.batch_size < 1 or self.patch_size < 1:
            raise ConfigError(f"{where}: total_iter, batch_size and patch_size must be >= 1")
        if min(self.print_freq, self.val_freq, self.save_checkpoint_freq) < 1:
            raise ConfigError(f"{where}: print_freq, val_freq and save_checkpoint_freq must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"{where}.ema_decay: must be in [0, 1), got {self.ema_decay}")
        if self.select == "best_val" and self.val_freq % self.save_checkpoint_freq:
            raise ConfigError(f"{where}.select: best_val needs val_freq to be a multiple of save_checkpoint_freq")


@dataclass
class DQCOptions(LoopOptions):
    """Distillation of the quantizer bounds against the FP teacher (2DQuant's DQC). Only bounds train.

    Defaults are a CPU schedule; the paper uses batch 32, 3000 iterations, 64x64 LR, cosine decay
    (released code: batch 16, 4000 iterations, betas (0.9, 0.99), constant lr).
    """

    scheduler: Literal["cosine", "constant"] = "cosine"
    feature_weight: float = 5.0  # lambda
    # paper: L_O = mean |O - Oq|, L_F = sum_i mean_b ||F/|F| - Fq/|Fq|||_2 / (C H W) (Eq. 4-6);
    # code: the released code's scaling, L1(mean) * B / numel(O) and MSE(mean) / numel(F) of the normalised
    # features. Norms are detached in both, as in the released code.
    loss: Literal["paper", "code"] = "paper"


@dataclass
class TrainPathOptions:
    pretrain_network_g: Optional[str] = None
    param_key_g: str = "auto"
    strict_load_g: bool = True
    # A training_states/<iter>.state file, or 'auto' for the latest one of this experiment.
    resume_state: Optional[str] = None


@dataclass
class NoiseAwareOptions:
    """Activation-noise-aware correction (``condiquant/transforms/noise_aware.py``):
    W = W0 (X^T Xq + rho I) (Xq^T Xq + rho I)^-1, Xq the layer's input after its activation quantizer."""

    # rho = ridge * trace(Xq^T Xq) / d: relative to the mean eigenvalue, so unitless. Default: parallel, 1e-2 is
    # within 0.1 dB of the best parallel cell on both W3A3 validation ablations (older code:
    # results/stale_4414dd0/ablation_noise_aware_*);
    # the tables use each arch's chosen cell (IMDN: sequential, ridge 0.1, 32 crops; EMT: parallel, 1e-3, 16).
    ridge: float = 1.0e-2
    # What the ridge pulls W towards: w0 (the original weights) or zero (plain ridge regression)
    anchor: Literal["w0", "zero"] = "w0"
    # Sequential: each layer's Xq comes from the quantized network with the layers before it already corrected
    # (one forward of all crops as a single batch); otherwise from the FP network's inputs.
    sequential: bool = False

    def validate(self, where: str) -> None:
        if not self.ridge >= 0:
            raise ConfigError(f"{where}.ridge: must be >= 0, got {self.ridge}")


@dataclass
class RotateOptions:
    """The rotation pass (``condiquant/transforms/rotation.py``): orthogonal R on the inputs of quantized
    Linear/Conv2d layers (online) and on attention q/k and v (absorbed offline), kept where it helps."""

    online: bool = True  # inputs of the quantized Linear/Conv2d layers (a channel matmul inside the layer)
    attention: bool = True  # q/k and v along the head dimension (SwinIR, EMT), absorbed into the projections
    # hadamard: randomised Hadamard where one of that order is built, else Haar-random; random: always Haar
    matrix: Literal["hadamard", "random"] = "hadamard"
    # error: rotate a site only where its quantization error on the calibration crops falls by > min_gain
    select: Literal["error", "all"] = "error"
    min_gain: float = 0.0
    layers: List[str] = field(default_factory=lambda: ["**"])  # among the quantized modules / attention modules
    num_patches: int = 4  # calibration crops of the error measurement (one batch)
    patch_size: int = 48
    dobi_steps: int = 50  # DOBI search of the measurement's quantizers
    max_samples: int = 1 << 16
    seed: int = 0  # random signs / matrices

    def validate(self, where: str) -> None:
        if not 0.0 <= self.min_gain < 1.0:
            raise ConfigError(f"{where}.min_gain: must be in [0, 1), got {self.min_gain}")


@dataclass
class ConditioningOptions:
    """Weight conditioning before bound learning. ``prox`` is CondiQuant's: min_W 1/2 ||X W^T - X W0^T||_F^2 +
    lam * G(W) by proximal gradient, X the layer's FP input on calibration crops (convolutions unfolded), K
    iterations, step 1/L. ``noise_aware`` fits W to the quantized input instead (``noise_aware:`` block)."""

    # Run in this order; noise_aware needs activation bounds, so the network is quantized (DOBI) before it, and
    # rotate (an FP transform) must come before noise_aware.
    passes: List[Literal["prox", "rotate", "noise_aware"]] = field(default_factory=lambda: ["prox"])
    noise_aware: NoiseAwareOptions = field(default_factory=NoiseAwareOptions)
    rotate: RotateOptions = field(default_factory=RotateOptions)
    # shrink: G = 1/2 sum (s_i - mean s)^2, prox s_i <- mean + (s_i - mean) / (1 + eta * lam)
    # kappa_bound: G = indicator(kappa <= kappa_max), prox clips s into [s_max / kappa_max, s_max]
    regularizer: Literal["shrink", "kappa_bound"] = "shrink"
    # Unitless: the data term is divided by its Lipschitz constant L, so the per-step shrink factor is
    # 1 / (1 + lam); with 1e-3 every held-out layer output of EMT/IMDN x4 moved < 5% (conditioning.json).
    # Chosen by scripts/ablate_conditioning.py: the best validation cell among those within ``tolerance`` (the
    # premise: outputs stay). IMDN and EMT x4 W3A3: shrink, lam 1e-3, K 100 (on EMT, lam 1e-2 scored higher
    # but moved a held-out layer output by 31%, so it is not a candidate).
    lam: float = 1.0e-3
    kappa_max: float = 30.0
    iters: int = 100
    targets: List[Literal["Linear", "Conv2d"]] = field(default_factory=lambda: ["Linear", "Conv2d"])
    layers: List[str] = field(default_factory=lambda: ["**"])  # among the quantized modules
    num_patches: int = 16  # calibration crops whose FP inputs give X^T X
    patch_size: int = 64
    holdout_patches: int = 8  # crops of the validation images for the output-equivalence check
    tolerance: float = 0.05  # prox: max relative change of any layer's output on the held-out crops
    on_violation: Literal["warn", "error"] = "warn"

    def validate(self, where: str) -> None:
        if not self.passes or len(set(self.passes)) != len(self.passes):
            raise ConfigError(f"{where}.passes: give each of 'prox', 'rotate', 'noise_aware' at most once, "
                              "at least one")
        if "rotate" in self.passes and "noise_aware" in self.passes and \
                self.passes.index("rotate") > self.passes.index("noise_aware"):
            raise ConfigError(f"{where}.passes: rotate transforms the FP network, so it must come before noise_aware")


@dataclass
class SAFTOptions(LoopOptions):
    """OAQ's sensitivity-aware finetuning of the quantizer parameters against the FP model (no ground truth).

    The ``total_iter`` updates are cut into ``epochs`` equal epochs; epoch e >= 1 trains one group,
    (e - 1) mod 3: weight bounds, activation bounds, breakpoints; each group has its own Adam, its lr decayed by
    ``gamma`` after each epoch it trains. Paper: 10 epochs over 100 DIV2K crops of 96x96 LR, update batch 2,
    lr 1e-3. The tables give SAFT DQC's update budget (same total_iter, batch and crop size).
    """

    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 2
    val_freq: int = 30
    save_checkpoint_freq: int = 30
    gamma: float = 0.9
    sen_weight: float = 10.0  # w_sktloss of the released code
    rec_weight: float = 5.0  # lambda of the output L1 term

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.epochs < 1 or self.total_iter % self.epochs:
            raise ConfigError(f"{where}.epochs: must be >= 1 and divide total_iter ({self.total_iter})")


@dataclass
class NoisyQuantOptions:
    """NoisyQuant (Liu et al., CVPR 2023): a fixed noisy bias n ~ U(-a s/2, a s/2) per input channel of each
    quantized layer (s: its input quantizer's step), a chosen per layer from ``amplitudes`` by the layer's output
    error on calibration crops; no training."""

    amplitudes: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    num_patches: int = 8  # calibration crops whose FP layer inputs score the amplitudes
    patch_size: int = 48


@dataclass
class PTQ4ViTOptions:
    """PTQ4ViT's Hessian-guided search (method ``ptq4vit``): ``candidates`` scaling factors from ``alpha_min`` to
    ``alpha_max`` times the max-based step, ``rounds`` alternations of weights and inputs, on ``num_patches``
    paired calibration crops. Released code: 100 candidates from 0.01 to 1.2, 3 rounds, 32 images (its README: 20
    candidates are enough)."""

    num_patches: int = 16
    patch_size: int = 48
    candidates: int = 20
    alpha_min: float = 0.01
    alpha_max: float = 1.2
    rounds: int = 3


@dataclass
class PaCOptions(LoopOptions):
    """PTQ4SR's pixel-aware calibration (method ``dbdc_pac``): the first half of ``total_iter`` trains the
    activation bounds at ``lr``, the second the weight bounds at ``weight_lr``, each cosine-decayed to
    ``end_factor`` of its lr; the loss is the L1 to the FP output. Released code: 250 + 250 updates, batch 2,
    HR 192 (LR 48 at x4), Adam 5e-3 -> 2e-3 and 5e-6 -> 2e-6."""

    total_iter: int = 500
    batch_size: int = 2
    patch_size: int = 48
    lr: float = 5e-3
    weight_lr: float = 5e-6
    end_factor: float = 0.4
    val_freq: int = 500
    save_checkpoint_freq: int = 50

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.total_iter % 2 or self.lr_scale != "absolute" or self.act_lr is not None:
            raise ConfigError(f"{where}: total_iter must be even (two phases); lr_scale absolute, act_lr unset "
                              f"(weight_lr sets the second phase)")


@dataclass
class ReconOptions(LoopOptions):
    """Reconstruction with learned rounding (methods ``adaround``: layer by layer, ``brecq``: block by block,
    ``qdrop``: block by block with activation quantization randomly dropped), ``condiquant/methods/recon.py``.

    Each unit (a block of ``blocks``, or a quantized layer outside every block; each quantized layer for adaround)
    is trained for ``iters_per_block`` updates on ``batch_size`` of ``num_patches`` cached calibration crops, in
    the order the network runs them: its inputs come from the quantized network with the earlier units done, its
    target is the FP network's output of the unit. ``total_iter`` is not read (units x iters_per_block).
    Rounding variables take ``lr``; activation bounds take ``act_lr`` in units of their range.
    AdaRound / BRECQ: 20k iterations per block, batch 32, 1024 images, rounding weight 0.01 (on sums), beta
    20 -> 2, warm-up 20%, QDrop p = 0.5. This CPU schedule is 100x shorter, so V needs a larger lr to reach 0 or 1
    (Adam moves it ~lr per update; |V| ~ 2.4 is hard) and the regulariser a larger weight; ``lr``, ``act_lr`` and
    ``round_weight`` were set on IMDN x4 W4A4's first block by its hard-rounded relative output MSE on the
    cached calibration crops (0.81 with nearest rounding and trained bounds; 0.27 / 0.24 / 0.18 / 0.16 with
    (round_weight, lr, act_lr) = (1, 0.05, 1e-3) / (10, 0.1, 1e-3) / (10, 0.1, 5e-3) / (10, 0.1, 2e-2)).
    """

    iters_per_block: int = 200
    blocks: Optional[List[str]] = None  # module-name patterns; None: the placement's feature_modules
    num_patches: int = 64  # cached calibration crops (LR)
    batch_size: int = 8
    lr: float = 0.1
    act_lr: Optional[float] = 1e-2
    lr_scale: Literal["absolute", "range"] = "range"
    round_weight: float = 10.0  # weight of the mean rounding regulariser against the relative output MSE
    # mse: plain output MSE; fisher: BRECQ's diagonal-Fisher weighting (squared gradient of the L1 loss to HR
    # with respect to the unit output, on the FP network; the crops then come with their HR crops)
    weighting: Literal["mse", "fisher"] = "mse"
    beta: List[float] = field(default_factory=lambda: [20.0, 2.0])  # regulariser exponent, annealed linearly
    round_warmup: float = 0.2  # share of a unit's updates before the regulariser starts
    drop_prob: float = 0.5  # qdrop: per element, the FP activation replaces the quantized one with this probability
    conditioning: bool = False  # run ``conditioning.passes`` first (as condiquant does before DQC)
    val_freq: int = 1 << 30  # mid-run validation would score a half-rounded unit: only the end is validated
    save_checkpoint_freq: int = 100

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.iters_per_block < 1 or self.num_patches < self.batch_size:
            raise ConfigError(f"{where}: iters_per_block must be >= 1 and num_patches >= batch_size")
        if len(self.beta) != 2 or not 0.0 <= self.round_warmup < 1.0 or not 0.0 <= self.drop_prob < 1.0:
            raise ConfigError(f"{where}: beta is [start, end]; round_warmup and drop_prob must be in [0, 1)")


Method = Literal["minmax", "percentile", "dobi", "2dquant", "condiquant", "oaq", "condiquant_oaq", "noisyquant",
                 "adaround", "brecq", "qdrop", "repq", "dbdc_pac", "ptq4vit", "compsrt"]
# The methods whose pipeline runs bound_init.bias_correction (after their bounds, before any training).
BIAS_CORRECTED = ("minmax", "percentile", "dobi", "2dquant", "condiquant", "compsrt")


@dataclass
class TrainOptions:
    """``python train.py -opt options/....yml``: calibrate a quantized network."""

    name: str
    scale: int
    network_g: Dict[str, Any]
    quant: QuantOptions
    method: Method = "2dquant"
    path: TrainPathOptions = field(default_factory=TrainPathOptions)
    calib: CalibOptions = field(default_factory=CalibOptions)
    bound_init: BoundInitOptions = field(default_factory=BoundInitOptions)
    dqc: DQCOptions = field(default_factory=DQCOptions)
    conditioning: ConditioningOptions = field(default_factory=ConditioningOptions)
    saft: SAFTOptions = field(default_factory=SAFTOptions)
    noisyquant: NoisyQuantOptions = field(default_factory=NoisyQuantOptions)
    recon: ReconOptions = field(default_factory=ReconOptions)
    pac: PaCOptions = field(default_factory=PaCOptions)
    ptq4vit: PTQ4ViTOptions = field(default_factory=PTQ4ViTOptions)
    device: str = "auto"
    num_threads: int = 0
    manual_seed: int = 0

    def validate(self, where: str) -> None:
        check_model_options(self, where)
        if self.method in ("oaq", "condiquant_oaq") and self.quant.a_quantizer != "dual_region":
            raise ConfigError(f"{where} quant.a_quantizer: method {self.method} needs 'dual_region'")
        if self.method == "repq" and self.quant.softmax_quantizer != "log2":
            raise ConfigError(f"{where} quant.softmax_quantizer: method repq needs 'log2' (RepQ-ViT's post-softmax "
                              f"quantizer)")
        twins = (self.quant.softmax_quantizer, self.quant.post_act_quantizer) == ("twin", "twin")
        if self.method == "ptq4vit" and not twins:
            raise ConfigError(f"{where} quant.softmax_quantizer: method ptq4vit needs softmax_quantizer and "
                              f"post_act_quantizer 'twin' (PTQ4ViT's twin-uniform grids)")
        if (self.method == "noisyquant") != self.quant.noisy_bias:
            raise ConfigError(f"{where} quant.noisy_bias: true exactly when method is noisyquant")
        if (self.method == "compsrt") != self.quant.hadamard:
            raise ConfigError(f"{where} quant.hadamard: true exactly when method is compsrt")
        if self.bound_init.bias_correction and self.method not in BIAS_CORRECTED:
            raise ConfigError(f"{where} bound_init.bias_correction: supported with methods "
                              f"{', '.join(BIAS_CORRECTED)}, not {self.method}")


@dataclass
class VariantOptions:
    """A table column that is not a plain ``method:`` value: a method with its own base options and overrides."""

    method: Method
    train_opt: Optional[str] = None  # None: the table's train_opt
    overrides: Dict[str, Any] = field(default_factory=dict)  # ``key.path: value``, after the table's
    bits: Optional[List[int]] = None  # the bit-widths of the table this row is run at; None = all
    seeds: Optional[List[int]] = None  # this row's seeds instead of the table's (e.g. 5 where the spread is studied)


@dataclass
class TableOptions:
    """``scripts/reproduce.py``: a grid of methods x bit-widths, each cell calibrated then scored."""

    name: str
    train_opt: str  # base PTQ options (method and bits are set per cell)
    test_opt: str  # FP scoring options: network, weights, datasets, protocol
    # Columns: ``method:`` values, or names of ``variants``.
    methods: List[str] = field(default_factory=lambda: ["minmax", "percentile", "dobi", "2dquant"])
    bits: List[int] = field(default_factory=lambda: [4, 3, 2])  # WbAb
    datasets: Optional[List[str]] = None  # subset of the test options' dataset names; None = all
    include_fp: bool = True
    include_bicubic: bool = True
    # Module of the long skip's residual branch (e.g. IMDN's LR_conv): adds the reference row FP_body_off, the FP
    # model with that branch's output zeroed, the floor a quantized body has to beat.
    body_off: Optional[str] = None
    # Overrides applied to every cell's train options (``key.path: value``), e.g. a faster DQC schedule.
    train_overrides: Dict[str, Any] = field(default_factory=dict)
    paper: Optional[str] = None  # key of condiquant/paper_tables.yml printed beside ours
    variants: Dict[str, VariantOptions] = field(default_factory=dict)
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])  # every trained row; untrained rows: the first
    extra_seeds: List[int] = field(default_factory=lambda: [3, 4])  # added where the validation std is larger than
    std_threshold: float = 0.1  # ... this (dB)
    seed_datasets: List[str] = field(default_factory=lambda: ["Set5"])  # scored for every seed; others: median seed
    num_threads: int = 1  # torch threads of every run (float results depend on it: part of the cache key)

    def validate(self, where: str) -> None:
        if not self.seeds or len(set(self.seeds + self.extra_seeds)) != len(self.seeds + self.extra_seeds):
            raise ConfigError(f"{where} seeds: give at least one seed, and no seed twice (with extra_seeds)")
        if self.datasets is not None and not set(self.seed_datasets) <= set(self.datasets):
            raise ConfigError(f"{where} seed_datasets: must be among datasets {self.datasets}")
        methods = typing.get_args(Method)
        for label in self.methods:
            if label not in self.variants and label not in methods:
                raise ConfigError(f"{where} methods: {label!r} is neither a method ({', '.join(methods)}) nor a "
                                  f"key of variants")
