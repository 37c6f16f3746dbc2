"""Resources: plain configurable objects that hand domain objects to the assets."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import dagster as dg

from hcc_assets.core.errors import PatientInputError
from hcc_assets.featurestore import FeatureStore
from hcc_assets.intake.dropzone import SkippedFolder, folder_fingerprint, folder_studies, scan_drop_zone
from hcc_assets.intake.pseudonym import (
    KEY_FILE_PARTS,
    load_or_create_key,
    load_or_create_key_on,
    pseudonymize,
    split_partition_key,
    study_partition_key,
)
from hcc_assets.lake import DataLake, LakeSettings, is_local_url, local_path_of


def env_seconds(name: str, default: int) -> int:
    """A whole number of seconds from the environment (read when the definitions load)."""
    value = int(os.environ.get(name, default))
    if value < 1:
        raise ValueError(f"{name} must be at least 1 second, got {value}")
    return value


class LakeResource(dg.ConfigurableResource):
    """The lake's settings (`hcc_assets.lake.LakeSettings`, which says what each one means) as a
    Dagster resource, with the pseudonym key and the drop zone's folders. `quiet_seconds`: how long
    a drop folder must be unchanged before it counts as complete."""

    root: str
    incoming: str = ""
    feature_store: str = ""
    feature_store_data: str = ""
    quiet_seconds: float = 60.0

    @property
    def settings(self) -> LakeSettings:
        return LakeSettings(self.root, self.incoming, self.feature_store, self.feature_store_data)

    @property
    def lake(self) -> DataLake:
        return DataLake(self.root)

    @property
    def incoming_dir(self) -> Path:
        return self.settings.incoming_dir

    @property
    def feature_store_catalog(self) -> str:
        return self.settings.feature_store_catalog

    @property
    def store(self) -> FeatureStore:
        return FeatureStore(self.feature_store_catalog, self.feature_store_data or None)

    def pseudonym_key(self) -> bytes:
        # The key sits beside the lake, never inside an output folder.
        if is_local_url(self.root):
            return load_or_create_key(local_path_of(self.root).joinpath(*KEY_FILE_PARTS))
        lake = self.lake  # object storage: one key object, created exclusively (or $HCC_ASSETS_PSEUDONYM_KEY)
        return load_or_create_key_on(lake.fs, lake.path(*KEY_FILE_PARTS))

    def pseudonym(self, source_key: str) -> str:
        return pseudonymize(source_key, self.pseudonym_key())

    def patient_folder(self, patient_id: str) -> Path:
        """The drop folder of the partition `patient_id` (a pseudonym, or a pseudonym's follow-up
        study `<pseudonym>.s<n>`); no name-to-key table is stored."""
        patient, _ = split_partition_key(patient_id)
        key = self.pseudonym_key()
        incoming = self.incoming_dir
        if incoming.is_dir():
            for entry in incoming.iterdir():
                if entry.is_dir() and pseudonymize(entry.name, key) == patient:
                    return entry
        raise dg.Failure(description=f"patient {patient_id}: no folder for this patient in the drop zone")

    def study_partitions(self, patient: str) -> dict[str, str]:
        """partition key -> study fingerprint, one per study in the patient's drop folder (the
        earliest keeps the bare pseudonym). A folder whose studies cannot be listed (two patients'
        studies) gives its bare pseudonym only: that run fails and says why."""
        try:
            folder = self.patient_folder(patient)
        except dg.Failure:  # removed since the drop zone was listed: nothing to run
            return {}
        try:
            studies = folder_studies(folder)
        except PatientInputError:
            return {patient: folder_fingerprint(folder)[0]}
        return {study_partition_key(patient, study.index): fingerprint for study, fingerprint in studies}

    def ready_patients(self, skipped: dict[str, str] | None = None) -> dict[str, tuple[str, str]]:
        """pseudonym -> (fingerprint, how completeness was decided) for complete drop folders;
        unreadable folders go into `skipped` (pseudonym -> reason) when it is given."""
        key = self.pseudonym_key()
        unreadable: list[SkippedFolder] = []
        ready = {
            pseudonymize(folder.source_key, key): (folder.fingerprint, folder.complete_by)
            for folder in scan_drop_zone(self.incoming_dir, self.quiet_seconds, skipped=unreadable)
        }
        if skipped is not None:
            skipped.update({pseudonymize(folder.source_key, key): folder.reason for folder in unreadable})
        return ready


def default_lake_resource() -> LakeResource:
    """The lake as the environment sets it (read when the definitions load): `LakeSettings.from_environment`."""
    return LakeResource(**dataclasses.asdict(LakeSettings.from_environment()))


class ComputeResource(dg.ConfigurableResource):
    """The one place that chooses where torch runs. `device`: auto | cpu | cuda:N (auto picks
    cuda when present). `mixed_precision`: autocast on a GPU, and bfloat16 on a CPU that computes
    it in hardware (AVX512-BF16 or AMX; elsewhere it has no effect): there the classifier's frozen
    trunk (its cache, the cohort's P(HCC), every embedding) runs about 2.5x faster; its training
    stays float32 (hcc_assets.deep.network.HCCResNet.use_bfloat16_on_cpu)."""

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
        from hcc_assets.deep import cpu_bf16_active

        device = self.torch_device()
        return self.mixed_precision and (device.startswith("cuda") or cpu_bf16_active(device, True))

    def configure_threads(self) -> None:
        import torch

        torch.set_num_threads(max(1, self.cpu_threads))
