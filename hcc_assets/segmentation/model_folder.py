"""Check a trained nnU-Net v2 model folder before anything loads it.

A folder is nnU-Net's results layout, `<trainer>__<plans>__<configuration>/` holding plans.json,
dataset.json and `fold_<f>/checkpoint_final.pth` (or checkpoint_best.pth). It may be ours (from
`train`) or one a user brings (mode a: a pretrained liver model). Nothing here unpickles the
checkpoint; the folder name and the two JSON files say everything needed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pydantic

CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth")  # in order of preference
# Readers whose voxel order we can reproduce in memory (see inference.LiverSegmenter).
SUPPORTED_READERS = {"SimpleITKIO": False, "NibabelIO": False, "NibabelIOWithReorient": True}


class ModelFolderError(ValueError):
    """The folder is not a usable nnU-Net v2 liver model; the message says why."""


class ModelInfo(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True)

    path: Path
    trainer_name: str
    plans_name: str
    configuration: str
    folds: tuple[int | str, ...]
    checkpoint_name: str
    checkpoint_sha256: str  # over the checkpoints of all folds in order (one fold: the file's hash)
    labels: dict[str, int]
    image_reader_writer: str
    reorient_to_ras: bool  # whether the model was trained on volumes reoriented to closest RAS


def validate_model_folder(path: Path | str) -> ModelInfo:
    folder = Path(path)
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist or is not a folder")
    plans = _load_json(folder / "plans.json", "plans")
    dataset = _load_json(folder / "dataset.json", "dataset")

    parts = folder.name.split("__")
    if len(parts) != 3:
        raise ModelFolderError(
            f"model folder name {folder.name!r} is not nnU-Net's '<trainer>__<plans>__<configuration>'"
        )
    trainer_name, plans_name, configuration = parts
    if configuration not in plans.get("configurations", {}):
        raise ModelFolderError(
            f"plans.json has no configuration {configuration!r} (the folder name's); "
            f"it has {sorted(plans.get('configurations', {}))}"
        )

    labels = dataset.get("labels") or {}
    if any(not isinstance(value, int) for value in labels.values()):
        raise ModelFolderError("dataset.json labels are regions; only plain integer labels are supported")
    if "liver" not in {name.lower() for name in labels}:
        raise ModelFolderError(f"dataset.json labels {sorted(labels)} have no 'liver' label")
    channels = dataset.get("channel_names") or dataset.get("modality") or {}
    if len(channels) != 1:
        raise ModelFolderError(f"the model expects {len(channels)} input channels; we have one (T2)")
    reader = plans.get("image_reader_writer")
    if reader not in SUPPORTED_READERS:
        raise ModelFolderError(f"plans.json image_reader_writer {reader!r} is not one of {sorted(SUPPORTED_READERS)}")

    checkpoints = _fold_checkpoints(folder)
    checkpoint_name = next(
        (name for name in CHECKPOINT_NAMES if all(name in found for found in checkpoints.values())), None
    )
    if checkpoint_name is None:
        raise ModelFolderError(
            f"no checkpoint ({' or '.join(CHECKPOINT_NAMES)}) common to all folds "
            f"{sorted(map(str, checkpoints))} in {folder}"
        )
    digest = hashlib.sha256()
    for fold in checkpoints:
        with open(folder / f"fold_{fold}" / checkpoint_name, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)

    return ModelInfo(
        path=folder.resolve(),
        trainer_name=trainer_name,
        plans_name=plans_name,
        configuration=configuration,
        folds=tuple(checkpoints),
        checkpoint_name=checkpoint_name,
        checkpoint_sha256=digest.hexdigest(),
        labels=dict(labels),
        image_reader_writer=reader,
        reorient_to_ras=SUPPORTED_READERS[reader],
    )


def _load_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ModelFolderError(f"{path.name} is missing from the model folder {path.parent}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFolderError(f"{path.name} ({what}) is not valid JSON: {error}") from None


def _fold_checkpoints(folder: Path) -> dict[int | str, set[str]]:
    """Fold -> checkpoint names present. Numbered folds form an ensemble; like nnU-Net's own
    auto-detection we use fold_all only when there are no numbered folds."""
    found: dict[int | str, set[str]] = {}
    for fold_dir in folder.glob("fold_*"):
        suffix = fold_dir.name.removeprefix("fold_")
        names = {name for name in CHECKPOINT_NAMES if (fold_dir / name).is_file()}
        if names and (suffix == "all" or suffix.isdigit()):
            found["all" if suffix == "all" else int(suffix)] = names
    numbered = sorted(fold for fold in found if fold != "all")
    if not found:
        raise ModelFolderError(f"no fold_<n>/ or fold_all/ folder with {' or '.join(CHECKPOINT_NAMES)} in {folder}")
    return {fold: found[fold] for fold in numbered} if numbered else {"all": found["all"]}
