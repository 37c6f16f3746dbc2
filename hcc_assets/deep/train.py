"""Training, checkpoints and embeddings for the study's deep arm (its learning-curve figure,
`plot_history`, is in `hcc_assets.core.figures`).

The trunk up to layer3 is frozen and there is no augmentation, so by default its activations are
computed once per volume ("trunk cache") and every epoch trains layer4 + head on them; the naive
path (full forward through the frozen trunk each step) stays behind `use_trunk_cache=False` for
when inputs change between epochs. Both compute the same losses and gradients.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from hcc_assets.core.files import atomic_write
from hcc_assets.deep.network import (
    Depth,
    HCCResNet,
    HeadActivation,
    TrunkLayout,
    build_classifier,
    cpu_has_native_bf16,
)

CHECKPOINT_NAME = "classifier.pt"
SUMMARY_NAME = "classifier.json"
CHECKPOINT_FORMAT = 1

VolumesLike = np.ndarray | Sequence[np.ndarray] | torch.Tensor


class ClassifierConfig(BaseModel):
    """The study's deep arm; defaults are the study's values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    depth: Depth = 50
    embedding_dim: int = Field(128, ge=1)
    head_activation: HeadActivation = "relu"
    trunk_layout: TrunkLayout = "monai"
    lr: float = Field(0.001, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    batch_size: int = Field(8, ge=1)
    min_epochs: int = Field(50, ge=1, description="the study trains at least this many epochs")
    max_epochs: int = Field(100, ge=1)
    patience: int = Field(10, ge=1, description="stop after this many epochs without validation-loss improvement")
    seed: int = 0
    medicalnet_checkpoint: str | None = Field(None, description="local MedicalNet .pth; None = seeded-random trunk")
    use_trunk_cache: bool = True
    device: str = "cpu"
    amp: bool = Field(
        False,
        description="mixed precision: training under autocast on cuda (bfloat16, else float16); on a CPU with "
        "bfloat16 instructions (AVX512-BF16 or AMX) the frozen trunk in bfloat16 while training stays float32 "
        "(HCCResNet.use_bfloat16_on_cpu); no effect on other CPUs",
    )

    @model_validator(mode="after")
    def _epochs_ordered(self) -> ClassifierConfig:
        if self.max_epochs < self.min_epochs:
            raise ValueError(f"max_epochs ({self.max_epochs}) < min_epochs ({self.min_epochs})")
        return self


@dataclass(frozen=True)
class EpochRecord:
    """One epoch. Training loss/accuracy are running values over the epoch's batches (layer4
    BatchNorm in train mode, as Keras-style curves report them); validation is in eval mode."""

    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    train_seconds: float
    val_seconds: float


@dataclass
class TrainingResult:
    model: HCCResNet  # best-validation-loss weights, eval mode
    config: ClassifierConfig
    history: list[EpochRecord]
    best_epoch: int
    stopped_early: bool
    init: str  # "seeded-random (...)" or "medicalnet:<sha256>"
    # best model in eval mode: train_loss, train_acc, val_loss, val_acc
    final_metrics: dict[str, float] = field(default_factory=dict)
    # cache_seconds, train_seconds (all epochs incl. validation), seconds_per_epoch
    timings: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    # P(HCC) of the training and validation volumes, in input order, by the returned model: its
    # final evaluation computes them anyway (on the trunk cache, in batches of `batch_size`), so a
    # caller needs no second pass through the trunk; saved with the model. None for a checkpoint
    # written before they were.
    train_probabilities: np.ndarray | None = None
    val_probabilities: np.ndarray | None = None

    @property
    def best_record(self) -> EpochRecord | None:
        return next((r for r in self.history if r.epoch == self.best_epoch), None)


# ---------------------------------------------------------------------------------------------
# inputs


def as_volume_batch(volumes: VolumesLike) -> torch.Tensor:
    """(N, X, Y, Z) or (N, 1, X, Y, Z) array, tensor or list of (X, Y, Z) arrays -> float32 (N, 1, X, Y, Z)."""
    if isinstance(volumes, torch.Tensor):
        batch = volumes.detach().to("cpu", torch.float32)
    else:
        stacked = np.stack([np.asarray(v) for v in volumes]) if not isinstance(volumes, np.ndarray) else volumes
        batch = torch.from_numpy(np.ascontiguousarray(stacked, dtype=np.float32))
    if batch.ndim == 4:
        batch = batch.unsqueeze(1)
    if batch.ndim != 5 or batch.shape[1] != 1:
        raise ValueError(f"expected volumes shaped (N, X, Y, Z) or (N, 1, X, Y, Z), got {tuple(batch.shape)}")
    if len(batch) == 0:
        raise ValueError("no volumes")
    if not torch.isfinite(batch).all():
        raise ValueError("volumes contain NaN or infinite values")
    return batch


def _as_labels(labels: Sequence | np.ndarray, count: int, what: str) -> torch.Tensor:
    values = torch.as_tensor(np.asarray(labels, dtype=np.float32).reshape(-1))
    if len(values) != count:
        raise ValueError(f"{what}: {count} volumes but {len(values)} labels")
    if not torch.isin(values, torch.tensor([0.0, 1.0])).all():
        raise ValueError(f"{what}: labels must be 0/1 (or booleans)")
    return values


# ---------------------------------------------------------------------------------------------
# training


def cpu_bf16_active(device: torch.device | str, amp: bool) -> bool:
    """Whether `amp` means a bfloat16 frozen trunk on this CPU: asked for, on a CPU, and the CPU
    computes bfloat16 in hardware. Without those instructions autocast would be slower than
    float32, so it stays off there."""
    return amp and torch.device(device).type == "cpu" and cpu_has_native_bf16()


def _mixed_precision(device: torch.device, enabled: bool) -> tuple[Callable, torch.amp.GradScaler]:
    """Autocast + gradient scaler for training on a GPU: bfloat16 where the GPU has it (no scaling
    needed), float16 otherwise. On a CPU training stays float32 (amp there means a bfloat16 frozen
    trunk only, see HCCResNet.use_bfloat16_on_cpu)."""
    use_amp = enabled and device.type == "cuda"
    dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and dtype == torch.float16)
    if not use_amp:
        return contextlib.nullcontext, scaler
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


def _synchronized_clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    batches = list(order.split(batch_size))
    # BatchNorm in train mode cannot normalize a single sample whose layer4 map is 1 voxel:
    # a trailing batch of one joins the previous batch.
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


@torch.no_grad()
def cache_frozen_features(
    model: HCCResNet,
    volumes: torch.Tensor,
    batch_size: int,
    device: torch.device,
    autocast=contextlib.nullcontext,
) -> torch.Tensor:
    """conv1..layer3 once per volume, kept on `device` as float32.

    no_grad rather than inference_mode: inference tensors cannot enter autograd later in layer4.
    """
    model.eval()
    parts = []
    for start in range(0, len(volumes), batch_size):
        with autocast():
            parts.append(model.frozen_features(volumes[start : start + batch_size].to(device)).float())
    return torch.cat(parts)


def train_classifier(
    train_volumes: VolumesLike,
    train_labels: Sequence | np.ndarray,
    val_volumes: VolumesLike,
    val_labels: Sequence | np.ndarray,
    config: ClassifierConfig | None = None,
    device: str | None = None,
    checkpoint: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> TrainingResult:
    """Train layer4 + head with SGD and BCE-with-logits; at least `min_epochs`, then stop after
    `patience` epochs without validation-loss improvement; return the best-validation-loss weights.

    `device` overrides `config.device`; `checkpoint` (a local MedicalNet file) overrides
    `config.medicalnet_checkpoint`. `progress` receives one line after the trunk cache and one per
    epoch (losses, accuracies, seconds, best epoch, ETA). Bit-reproducible for a given seed on CPU with the same thread
    count; on CUDA cuDNN may choose nondeterministic kernels, so expect tiny differences there.
    """
    config = config or ClassifierConfig()
    device_ = torch.device(device or config.device)
    x_train, x_val = as_volume_batch(train_volumes), as_volume_batch(val_volumes)
    y_train = _as_labels(train_labels, len(x_train), "training set").to(device_)
    y_val = _as_labels(val_labels, len(x_val), "validation set").to(device_)
    if len(x_train) < 2:
        raise ValueError("training needs at least 2 volumes (BatchNorm in layer4)")

    model = build_classifier(
        config.depth,
        config.embedding_dim,
        config.head_activation,
        config.trunk_layout,
        seed=config.seed,
        medicalnet_checkpoint=checkpoint or config.medicalnet_checkpoint,
    ).to(device_)
    autocast, scaler = _mixed_precision(device_, config.amp)
    model.use_bfloat16_on_cpu(cpu_bf16_active(device_, config.amp))

    started = _synchronized_clock(device_)
    if config.use_trunk_cache:
        train_inputs = cache_frozen_features(model, x_train, config.batch_size, device_, autocast)
        val_inputs = cache_frozen_features(model, x_val, config.batch_size, device_, autocast)

        def logits_of(inputs: torch.Tensor) -> torch.Tensor:
            return model.head(inputs)[0]
    else:
        train_inputs, val_inputs = x_train, x_val
        logits_of = model
    cache_seconds = _synchronized_clock(device_) - started
    if progress is not None and config.use_trunk_cache:
        progress(f"trunk cache: conv1..layer3 of {len(x_train) + len(x_val)} volumes in {cache_seconds:.1f} s")

    def batch_of(inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return inputs[index.to(inputs.device)].to(device_, non_blocking=True)

    @torch.no_grad()
    def evaluate(inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, np.ndarray]:
        """Mean loss, accuracy and P(HCC) of each input."""
        model.eval()
        loss_sum, correct, probabilities = 0.0, 0, []
        for index in torch.arange(len(inputs)).split(config.batch_size):
            targets = labels[index.to(device_)]
            with autocast():
                logits = logits_of(batch_of(inputs, index)).float()
            loss_sum += nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="sum").item()
            correct += int(((logits > 0).float() == targets).sum().item())
            probabilities.append(torch.sigmoid(logits).cpu())
        return loss_sum / len(inputs), correct / len(inputs), torch.cat(probabilities).numpy().astype(np.float32)

    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=config.lr, momentum=config.momentum)
    loss_fn = nn.BCEWithLogitsLoss()
    shuffler = torch.Generator().manual_seed(config.seed)
    history: list[EpochRecord] = []
    best_loss, best_epoch, best_state, stopped_early = float("inf"), 0, model.trainable_state(), False

    for epoch in range(1, config.max_epochs + 1):
        epoch_start = _synchronized_clock(device_)
        model.train()
        loss_sum, correct = 0.0, 0
        for index in _batches(torch.randperm(len(train_inputs), generator=shuffler), config.batch_size):
            targets = y_train[index.to(device_)]
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                logits = logits_of(batch_of(train_inputs, index)).float()
            loss = loss_fn(logits, targets)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.item() * len(index)
            correct += int(((logits.detach() > 0).float() == targets).sum().item())
        val_start = _synchronized_clock(device_)
        val_loss, val_acc, _ = evaluate(val_inputs, y_val)
        val_end = _synchronized_clock(device_)
        history.append(
            EpochRecord(
                epoch,
                loss_sum / len(train_inputs),
                correct / len(train_inputs),
                val_loss,
                val_acc,
                val_start - epoch_start,
                val_end - val_start,
            )
        )
        if val_loss < best_loss:
            best_loss, best_epoch, best_state = val_loss, epoch, model.trainable_state()
        if progress is not None:
            progress(_epoch_line(history, config, best_epoch))
        if epoch >= config.min_epochs and epoch - best_epoch >= config.patience:
            stopped_early = epoch < config.max_epochs
            break

    incompatible = model.load_state_dict(best_state, strict=False)
    assert not incompatible.unexpected_keys, incompatible.unexpected_keys
    train_loss, train_acc, train_probabilities = evaluate(train_inputs, y_train)
    final_val_loss, final_val_acc, val_probabilities = evaluate(val_inputs, y_val)
    model.eval()
    train_seconds = _synchronized_clock(device_) - started - cache_seconds
    return TrainingResult(
        model=model,
        config=config,
        history=history,
        best_epoch=best_epoch,
        stopped_early=stopped_early,
        init=model.init_description,
        final_metrics=dict(train_loss=train_loss, train_acc=train_acc, val_loss=final_val_loss, val_acc=final_val_acc),
        timings=dict(
            cache_seconds=cache_seconds,
            train_seconds=train_seconds,
            seconds_per_epoch=sum(r.train_seconds + r.val_seconds for r in history) / len(history),
        ),
        device=str(device_),
        train_probabilities=train_probabilities,
        val_probabilities=val_probabilities,
    )


def _epoch_line(history: list[EpochRecord], config: ClassifierConfig, best_epoch: int) -> str:
    """One progress line. The run ends between the next possible early stop and max_epochs, so the
    ETA is that range at the mean epoch time so far."""
    record = history[-1]
    seconds = sum(r.train_seconds + r.val_seconds for r in history) / len(history)
    earliest = min(config.max_epochs, max(config.min_epochs, best_epoch + config.patience))
    eta_low, eta_high = (max(0, earliest - record.epoch) * seconds, (config.max_epochs - record.epoch) * seconds)
    eta = f"{eta_low:.0f} s" if eta_low == eta_high else f"{eta_low:.0f}-{eta_high:.0f} s"
    return (
        f"epoch {record.epoch}/{config.max_epochs}: train loss {record.train_loss:.4f} acc {record.train_acc:.2f}, "
        f"val loss {record.val_loss:.4f} acc {record.val_acc:.2f}, best epoch {best_epoch}, "
        f"{record.train_seconds + record.val_seconds:.1f} s, ETA {eta}"
    )


# ---------------------------------------------------------------------------------------------
# inference


@torch.no_grad()
def _run(model: HCCResNet, volumes: VolumesLike, batch_size: int, device: str) -> tuple[np.ndarray, np.ndarray]:
    """Logits and embeddings, float32 (the frozen trunk in bfloat16 where the model trained so on a
    CPU and this CPU has it, see HCCResNet.use_bfloat16_on_cpu)."""
    device_ = torch.device(device)
    model.to(device_).eval()
    batch = as_volume_batch(volumes)
    logits, embeddings = [], []
    for start in range(0, len(batch), batch_size):
        batch_logits, batch_embedding = model.head(model.frozen_features(batch[start : start + batch_size].to(device_)))
        logits.append(batch_logits.float().cpu())
        embeddings.append(batch_embedding.float().cpu())
    return torch.cat(logits).numpy(), torch.cat(embeddings).numpy()


def embed(model: HCCResNet, volumes: VolumesLike, batch_size: int = 8, device: str = "cpu") -> np.ndarray:
    """Deep embedding: the 128-unit layer's activations per volume, (N, 128) float32 (eval mode)."""
    return _run(model, volumes, batch_size, device)[1]


def predict_proba(model: HCCResNet, volumes: VolumesLike, batch_size: int = 8, device: str = "cpu") -> np.ndarray:
    """P(HCC) per volume, (N,) float32 (eval mode)."""
    logits = _run(model, volumes, batch_size, device)[0]
    return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)


def probability_from_embedding(model: HCCResNet, embedding: np.ndarray) -> np.ndarray:
    """P(HCC) from stored deep embeddings, (N, 128) -> (N,): the output layer applied to the 128-unit
    layer's activations, which is all the network does after that layer, so the prediction and the
    embedding come from one forward pass."""
    values = np.asarray(embedding, dtype=np.float32).reshape(-1, model.output.in_features)
    weight = model.output.weight.detach().float().cpu().numpy()  # (1, 128); the model stays where it is
    bias = model.output.bias.detach().float().cpu().numpy()
    logits = (values @ weight.T + bias)[:, 0]
    return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# checkpoints


def save_model(trained: TrainingResult | HCCResNet, folder: str | Path, config: ClassifierConfig | None = None) -> Path:
    """Write `classifier.pt` (weights, config, history: all that `load_model` needs, in one atomic
    file) and a readable `classifier.json` summary into `folder`. Returns the checkpoint path."""
    if isinstance(trained, TrainingResult):
        result = trained
    else:
        if config is None:
            raise ValueError("save_model(model, ...) needs the config it was built with")
        result = TrainingResult(
            model=trained, config=config, history=[], best_epoch=0, stopped_early=False, init=trained.init_description
        )
    summary = {
        "format": CHECKPOINT_FORMAT,
        "architecture": result.model.architecture,
        "init": result.init,
        "config": result.config.model_dump(mode="json"),
        "history": [asdict(record) for record in result.history],
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "final_metrics": result.final_metrics,
        "timings": result.timings,
        "device": result.device,
        # float32 values as JSON floats: read back bit for bit
        "train_probabilities": _float_list(result.train_probabilities),
        "val_probabilities": _float_list(result.val_probabilities),
    }
    weights = {key: value.detach().cpu() for key, value in result.model.state_dict().items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / CHECKPOINT_NAME
    atomic_write(checkpoint, lambda file: torch.save({**summary, "state_dict": weights}, file))
    atomic_write(folder / SUMMARY_NAME, lambda file: file.write(json.dumps(summary, indent=2).encode()))
    return checkpoint


def load_model(folder: str | Path, device: str = "cpu") -> TrainingResult:
    """Read what `save_model` wrote; the model comes back in eval mode on `device`."""
    stored = torch.load(Path(folder) / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    if stored.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"unknown classifier checkpoint format {stored.get('format')!r}")
    with torch.random.fork_rng(devices=[]):  # the weights are overwritten; keep the caller's RNG untouched
        model = HCCResNet(**stored["architecture"])
    model.load_state_dict(stored["state_dict"], strict=True)
    model.init_description = stored["init"]
    # the frozen trunk as in training: bfloat16 where the model trained so on a CPU (and this CPU has it)
    model.use_bfloat16_on_cpu(bool(stored["config"].get("amp")) and stored.get("device", "cpu").startswith("cpu"))
    return TrainingResult(
        model=model.to(torch.device(device)).eval(),
        config=ClassifierConfig(**stored["config"]),
        history=[EpochRecord(**record) for record in stored["history"]],
        best_epoch=stored["best_epoch"],
        stopped_early=stored["stopped_early"],
        init=stored["init"],
        final_metrics=stored["final_metrics"],
        timings=stored["timings"],
        device=device,
        train_probabilities=_float_array(stored.get("train_probabilities")),
        val_probabilities=_float_array(stored.get("val_probabilities")),
    )


def _float_list(values: np.ndarray | None) -> list[float] | None:
    return None if values is None else [float(v) for v in np.asarray(values, np.float32)]


def _float_array(values: list[float] | None) -> np.ndarray | None:
    return None if values is None else np.asarray(values, np.float32)
