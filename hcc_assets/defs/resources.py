"""Resources: plain configurable objects that hand domain objects to the assets."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from hcc_assets.featurestore import FeatureStore
from hcc_assets.imaging.dropzone import scan_drop_zone
from hcc_assets.imaging.pseudonym import load_or_create_key, pseudonymize
from hcc_assets.lake import DataLake

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def default_lake_root() -> str:
    return os.environ.get("HCC_ASSETS_LAKE", str(PROJECT_ROOT / "data_lake"))


class LakeResource(dg.ConfigurableResource):
    """Where data lives: the lake root (local folder or fsspec URL), the drop zone and the
    feature store. `incoming` defaults to <root>/incoming; it is read-only to the platform."""

    root: str
    incoming: str = ""
    feature_store: str = ""
    quiet_seconds: float = 60.0

    @property
    def lake(self) -> DataLake:
        return DataLake(self.root)

    @property
    def incoming_dir(self) -> Path:
        return Path(self.incoming or os.path.join(self.root, "incoming"))

    @property
    def store(self) -> FeatureStore:
        return FeatureStore(self.feature_store or os.path.join(self.root, "feature_store.duckdb"))

    def pseudonym_key(self) -> bytes:
        # The key sits beside the lake, never inside an output folder.
        return load_or_create_key(Path(self.root) / "private" / "pseudonym.key")

    def pseudonym(self, source_key: str) -> str:
        return pseudonymize(source_key, self.pseudonym_key())

    def patient_folder(self, patient_id: str) -> Path:
        """The drop folder whose pseudonym is `patient_id` (no name-to-key table is stored)."""
        key = self.pseudonym_key()
        incoming = self.incoming_dir
        if incoming.is_dir():
            for entry in incoming.iterdir():
                if entry.is_dir() and pseudonymize(entry.name, key) == patient_id:
                    return entry
        raise dg.Failure(description=f"patient {patient_id}: no folder for this patient in the drop zone")

    def ready_patients(self) -> dict[str, tuple[str, str]]:
        """pseudonym -> (fingerprint, how completeness was decided) for complete drop folders."""
        key = self.pseudonym_key()
        return {
            pseudonymize(folder.source_key, key): (folder.fingerprint, folder.complete_by)
            for folder in scan_drop_zone(self.incoming_dir, self.quiet_seconds)
        }


class ComputeResource(dg.ConfigurableResource):
    """The one place that chooses where torch runs. `device`: auto | cpu | cuda:N (auto picks
    cuda when present). Mixed precision only ever applies on a GPU."""

    device: str = "auto"
    cpu_threads: int = 2
    mixed_precision: bool = True

    def torch_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda:0" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise dg.Failure(description=f"compute device {self.device} requested but no CUDA GPU is visible")
        return self.device

    def use_amp(self) -> bool:
        return self.mixed_precision and self.torch_device().startswith("cuda")

    def configure_threads(self) -> None:
        import torch

        torch.set_num_threads(max(1, self.cpu_threads))
