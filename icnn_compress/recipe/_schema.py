"""The recipe schema: one typed config per stage, composed into a Recipe (pydantic)."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "AnalysisConfig",
    "DataConfig",
    "DistillConfig",
    "ExportConfig",
    "FinetuneConfig",
    "ICNNConfig",
    "MeasureConfig",
    "ModelConfig",
    "PruneConfig",
    "QuantizeConfig",
    "Recipe",
    "RecoverConfig",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Strict):
    """Which data, from where, in which batches."""

    name: Literal["synthetic-parts", "fashion-mnist", "imagefolder", "cub200"] = Field(
        "synthetic-parts", description="dataset (icnn_compress.data.list_datasets())"
    )
    root: str | None = Field(
        None, description="dataset folder (fashion-mnist: the Debian package's by default)"
    )
    batch_size: int = Field(64, ge=1, le=4096, description="training batch size")
    num_classes: int = Field(6, ge=2, le=100_000, description="classes (synthetic-parts: number to generate)")
    image_size: int = Field(
        32, ge=16, le=2048, description="input side in pixels (synthetic-parts, imagefolder, cub200)"
    )
    train_size: int = Field(2000, ge=1, le=10_000_000, description="synthetic-parts: training items")
    val_size: int = Field(400, ge=1, le=10_000_000, description="synthetic-parts: validation items")
    difficulty: Literal["easy", "hard"] = Field(
        "easy", description="synthetic-parts: 'hard' = shared parts, occluders, clutter, pose changes"
    )
    limit: int | None = Field(
        None, ge=1, description="fashion-mnist: keep only the first N items (quick runs)"
    )
    num_workers: int = Field(0, ge=0, le=256, description="DataLoader workers")
    seed: int = Field(0, ge=0, lt=2**63, description="shuffling and data seed")


class ModelConfig(_Strict):
    """The network."""

    name: str = Field(
        "vgg_small", description="registry name (icnn_compress.models.list_models()), or 'timm:<name>'"
    )
    in_channels: int = Field(3, ge=1, le=4096, description="input channels (1 for Fashion-MNIST)")
    small_input: bool | None = Field(None, description="adapt torchvision stems to ~32 px inputs")
    weights: str | None = Field(
        None,
        description="local state-dict file (weights_only), a torchvision weights name, or 'pretrained' "
        "(timm: from the local Hugging Face cache)",
    )


class ICNNConfig(_Strict):
    """The interpretable filter loss (attach_icnn options)."""

    enabled: bool = Field(True, description="fine-tune with masks + the loss (False: plain fine-tune)")
    layers: list[str] | Literal["auto"] = Field("auto", description="conv layer names, or 'auto' (last conv)")
    weight: float = Field(0.5, ge=0, le=1000, description="lambda (balance='grad': gradient-RMS ratio)")
    balance: Literal["grad", "none"] = Field(
        "grad", description="'grad': weight = filter-loss / task gradient RMS at the maps; 'none': literal"
    )
    warmup_steps: int = Field(200, ge=0, le=10_000_000, description="linear ramp of the weight (steps)")
    beta: float = Field(4.0, gt=0, le=1000, description="template slope (the paper's 4)")
    centre: Literal["argmax", "centroid"] = Field(
        "argmax", description="mask centre: the strongest cell, or the activation-weighted centre"
    )
    categories: Literal["multi", "balanced", "single"] = Field(
        "multi", description="filter -> class: argmax response (paper), balanced per class, or one class"
    )
    unmask_epochs: int = Field(
        0,
        ge=0,
        le=10_000,
        description="the last N fine-tune epochs run with the masks off and without the loss "
        "(the deployed model has no masks); 0: masks throughout",
    )

    def options(self):
        """These settings as the ``ICNNOptions`` of ``attach_icnn`` (the saved model's masks are
        off when the last epochs ran without them)."""
        from icnn_compress.icnn import ICNNOptions

        keys = ("weight", "balance", "warmup_steps", "beta", "centre", "categories")
        return ICNNOptions(**{k: getattr(self, k) for k in keys}, mask=self.unmask_epochs == 0)


class DistillConfig(_Strict):
    """Knowledge distillation from the model as it was before the stage (a frozen teacher)."""

    enabled: bool = Field(True, description="distil from the model before the stage (False: plain CE)")
    weight: float = Field(0.5, ge=0, le=1, description="share of the soft (KL) term in the loss")
    temperature: float = Field(4.0, gt=0, le=100, description="softmax temperature of both sides")


class FinetuneConfig(_Strict):
    """The fine-tune (with the loss when icnn.enabled)."""

    epochs: int = Field(1, ge=0, le=10_000, description="0 skips training")
    lr: float = Field(0.05, gt=0, le=10, description="learning rate at the start")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="SGD with momentum 0.9, or AdamW")
    schedule: Literal["cosine", "step", "loglinear", "constant"] = Field(
        "cosine", description="learning-rate schedule, updated every step"
    )
    step_epochs: int = Field(
        30, ge=1, le=10_000, description="schedule 'step': multiply lr by gamma every N epochs"
    )
    gamma: float = Field(0.1, gt=0, le=1, description="schedule 'step': the factor")
    lr_end: float = Field(0.0, ge=0, le=10, description="final learning rate (cosine, loglinear)")
    weight_decay: float = Field(5e-4, ge=0, le=1, description="L2 weight decay")
    clip_grad_norm: float | None = Field(None, gt=0, le=1e6, description="clip the gradient norm (null: off)")
    distill: DistillConfig = Field(
        default_factory=lambda: DistillConfig(enabled=False),
        description="teacher: the model before the fine-tune (off: it cost accuracy with the masks)",
    )
    tensorboard: bool = Field(
        False,
        description="also write the per-epoch metrics of fine-tune and recovery as TensorBoard scalars "
        "(<stage folder>/tensorboard; needs the tensorboard package)",
    )


class AnalysisConfig(_Strict):
    """Filter signatures, clusters and pictures of the ICNN layers."""

    probe_images: int = Field(512, ge=8, le=1_000_000, description="images probed")
    distance_threshold: float = Field(0.25, gt=0, le=2, description="cluster merge distance")
    pictures: bool = Field(True, description="write the gallery/overview PNGs")


TARGET_KEYS = ("macs_reduction", "params_reduction", "latency_speedup")


Teacher = Literal["auto", "finetuned", "base"]


def resolve_teacher(choice: str, *, loss_finetune: bool, has_weights: bool) -> str:
    """``prune.refit_teacher`` / ``recover.teacher`` made concrete, ``"finetuned"`` or ``"base"``:
    ``auto`` is ``base`` when the fine-tune trained with the filter loss (``loss_finetune``) and
    the base model is a trained one (``has_weights``), else ``finetuned``."""
    if choice != "auto":
        return choice
    return "base" if loss_finetune and has_weights else "finetuned"


class PruneConfig(_Strict):
    """Structural pruning."""

    criterion: str = Field("icnn-cluster", description="icnn_compress.prune.list_criteria()")
    macs_reduction: float | None = Field(
        None, gt=1, le=1000, description="target: this many times fewer MACs (2.0 when no target is set)"
    )
    params_reduction: float | None = Field(
        None, gt=1, le=1000, description="target instead: this many times fewer parameters"
    )
    latency_speedup: float | None = Field(
        None, gt=1, le=1000, description="target instead: this measured ONNX Runtime speedup (CPU)"
    )
    latency_batch: int = Field(32, ge=1, le=4096, description="batch size of the latency_speedup target")
    compensate: bool = Field(True, description="fold what the kept channels reconstruct into the consumers")
    round_to: int | None = Field(8, ge=1, le=1024, description="keep widths multiples of this (fast kernels)")
    allocation: Literal["uniform", "latency"] = Field(
        "uniform",
        description="channels per layer: uniform (round_to) or latency (planned from ONNX Runtime "
        "latency tables measured on this machine; a macs_reduction or latency_speedup target)",
    )
    criterion_options: dict[str, bool | int | float | str] = Field(
        default_factory=dict,
        max_length=100,
        description="options of prune.criterion, as its keyword arguments (python -c 'import "
        'icnn_compress.prune as p; print(p.criterion_spec("fisher").options)\' lists them), e.g. '
        "{residual: false} for fisher or {stream_ranking: magnitude} for icnn-cluster; an option the "
        "criterion does not take is an error; icnn-cluster's distance_threshold is "
        "analysis.distance_threshold",
    )
    max_layer_ratio: float = Field(0.9, gt=0, lt=1, description="at most this share of a layer is removed")
    global_ranking: bool = Field(
        False, description="rank channels across layers (else the same ratio in each)"
    )
    ignored_layers: list[str] = Field(
        default_factory=list, max_length=10_000, description="module names never pruned"
    )
    step_ratio: float = Field(0.05, gt=0, lt=1, description="largest channel share removed per step")
    bn_batches: int = Field(
        20, ge=0, le=100_000, description="batches to re-estimate BatchNorm after pruning"
    )
    refit_classifier: bool | None = Field(
        None,
        description="refit the last Linear layer to the unpruned model's outputs on the probe "
        "batches after pruning (least squares, no training); null: only when recover.epochs is 0 "
        "(one-shot +0.0 to +24 points, after 150 recovery steps -0.2 on average: benchmarks table 10)",
    )
    refit_teacher: Teacher = Field(
        "auto",
        description="whose outputs the classifier refit fits: the unpruned fine-tuned model, or the "
        "base model the fine-tune started from (needs model.weights); auto: the base model when the "
        "fine-tune used the filter loss and model.weights is a whole trained model, else the "
        "fine-tuned model (quick bases, one-shot top-1 of the loss model: resnet_cifar20 +0.26 to "
        "+0.41 point, vgg_small +0.05 to +0.24; benchmarks table 10d; at the full budget a tie, "
        "table 10f)",
    )
    keep_classes: list[Annotated[int, Field(ge=0)]] | None = Field(
        None,
        min_length=2,
        description="specialise to these classes: the head keeps them, filters are ranked by their "
        "relevance to them (on every class), compensation, BatchNorm and the classifier refit use "
        "their images; recovery, export and measurement then use these classes only",
    )
    keep_classes_mode: Literal["relevance", "category", "criterion"] = Field(
        "relevance",
        description="keep_classes: weigh scores by relevance, other categories first, or the criterion's "
        "own scores (with criterion 'taylor' or 'fisher': the kept classes' loss through the restricted "
        "head; 'criterion' with criterion 'fisher' and compensate measured best: +2.4 / +1.3 points "
        "one-shot over a restricted head + l2 with 2 / 5 of 10 classes kept at 4x, benchmarks 8f)",
    )

    @model_validator(mode="after")
    def _one_target(self) -> PruneConfig:
        given = [k for k in TARGET_KEYS if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(
                f"give one target of {', '.join(TARGET_KEYS)}; got {' and '.join(given)} (set the other "
                f"to null, e.g. --set prune.{given[0]}=null)"
            )
        if self.allocation == "latency" and self.params_reduction is not None:
            raise ValueError(
                "allocation 'latency' plans for macs_reduction or latency_speedup, not params_reduction"
            )
        if self.allocation == "latency" and self.keep_classes is not None:
            raise ValueError("allocation 'latency' does not combine with keep_classes; use 'uniform'")
        return self

    @property
    def target(self) -> dict:
        """The pruning target as ``Target`` fields."""
        if self.params_reduction is not None:
            return {"params_reduction": self.params_reduction}
        if self.latency_speedup is not None:
            return {"latency_speedup": self.latency_speedup, "latency_batch": self.latency_batch}
        return {"macs_reduction": self.macs_reduction or 2.0}


class RecoverConfig(_Strict):
    """The short fine-tune after pruning."""

    epochs: int = Field(1, ge=0, le=10_000, description="0 skips recovery")
    lr: float = Field(0.01, gt=0, le=10, description="learning rate of the recovery fine-tune")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="teacher: recover.teacher")
    teacher: Teacher = Field(
        "auto",
        description="whom recovery distils from: the unpruned fine-tuned model, or the base model "
        "the fine-tune started from (needs model.weights); auto: the base model when the fine-tune "
        "used the filter loss and model.weights is a whole trained model, else the fine-tuned model "
        "(quick bases, recovered top-1 of the loss model: resnet_cifar20 +0.25 to +0.35 point, "
        "vgg_small +0.29 to +0.35; benchmarks table 10c; at the full budget a tie, table 10f)",
    )


class ExportConfig(_Strict):
    """ONNX export."""

    opset: int = Field(17, ge=11, le=20, description="ONNX opset (11-20)")


class QuantizeConfig(_Strict):
    """INT8 post-training quantization of the pruned ONNX model (ONNX Runtime, static, QDQ)."""

    enabled: bool = Field(True, description="write and measure an INT8 copy of the pruned model")
    method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="how activation ranges are chosen from the calibration batches"
    )
    per_channel: bool = Field(True, description="one weight scale per output channel")
    calibration_batches: int = Field(
        16, ge=1, le=100_000, description="training batches the activation ranges are observed on"
    )
    min_agreement: float = Field(
        0.98,
        ge=0,
        le=1,
        description="refuse the INT8 model when its top-1 agrees with the float model's on fewer "
        "validation images than this share",
    )
    keep_float: Literal["auto", "none"] | list[str] = Field(
        "auto",
        description="convolutions left in float: 'auto' (the stages that make the whole INT8 model "
        "faster on this machine when left in float; timed once per model, batch and threads, then "
        "cached), 'none', or ONNX Conv node names (another machine: the first run's kept_float)",
    )
    timing_batch: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="batch size 'auto' times at (null: the largest of measure.batch_sizes)",
    )
    timing_threads: int | None = Field(
        None, ge=1, le=1024, description="ONNX Runtime threads 'auto' times with (null: measure.threads)"
    )
    reduce_range: Literal["auto"] | bool = Field(
        "auto",
        description="7-bit weights: 'auto' (on x86 CPUs without VNNI, whose 8-bit kernels can "
        "saturate), true or false (false for a model that will run on a VNNI CPU or Arm)",
    )

    def options(self, measure: MeasureConfig | None = None):
        """These settings as the ``QuantizeOptions`` of ``quantize_onnx``; an unset timing batch or
        thread count comes from ``measure`` (the batch and threads the models are measured at)."""
        from icnn_compress.quantize import QuantizeOptions

        names = [f.name for f in dataclasses.fields(QuantizeOptions) if f.name in type(self).model_fields]
        values = {name: getattr(self, name) for name in names}
        if measure is not None:
            values["timing_batch"] = values["timing_batch"] or max(measure.batch_sizes)
            values["timing_threads"] = values["timing_threads"] or measure.threads
        return QuantizeOptions(**{k: v for k, v in values.items() if v is not None})


class MeasureConfig(_Strict):
    """Measurement of the exported models in ONNX Runtime."""

    batch_sizes: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=lambda: [1, 32],
        min_length=1,
        max_length=16,
        description="batch sizes timed (the largest is the report's speedup batch)",
    )
    threads: int = Field(2, ge=1, le=1024, description="ONNX Runtime intra-op threads")
    provider: Literal["auto", "cpu", "cuda", "tensorrt"] = Field(
        "auto", description="ONNX Runtime execution provider (auto: the best available)"
    )
    repeats: int = Field(30, ge=1, le=100_000, description="timed runs per batch size (median reported)")


class Recipe(_Strict):
    """A whole run: data, model, fine-tune, analyse, prune, recover, export, quantize, measure, report."""

    name: str = Field(
        "run",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$",
        description="a plain identifier (letters, digits, _ and -): runs/<name> and the report title",
    )
    seed: int = Field(0, ge=0, lt=2**63, description="seed of every stage (each stage derives its own)")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    icnn: ICNNConfig = Field(default_factory=ICNNConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    recover: RecoverConfig = Field(default_factory=RecoverConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    measure: MeasureConfig = Field(default_factory=MeasureConfig)
