"""Radiomics through hcc_assets vs a bare pyradiomics call, on one synthetic liver volume.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/radiomics_overhead.py [--repeats 5]

Prints the median seconds of
  ours: hcc_assets.radiomics.extract(nibabel image, nibabel mask), conversion to SimpleITK included;
  bare: RadiomicsFeatureExtractor(params).execute(sitk_image, sitk_mask) on images already in ITK;
and ours / bare (goal <= 1.3); also bare with the extractor built once, the strictest baseline. Then one extraction on the same anatomy at the 128x128x64 grid of
the preprocessed volume, to compare native vs preprocessed input.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from hcc_assets import radiomics as hcc_radiomics


def synthetic_liver(shape=(256, 256, 40), spacing=(1.6, 1.6, 7.0), seed=0):
    """T2-like volume with a textured ~1.8 L liver and two lesions; (image, mask) in RAS."""
    rng = np.random.default_rng(seed)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -np.asarray(spacing) * (np.asarray(shape) - 1) / 2
    axes = [np.arange(n, dtype=np.float32) * s + o for n, s, o in zip(shape, spacing, affine[:3, 3])]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    body = (x / 170) ** 2 + (y / 125) ** 2 < 1
    liver = ((x - 60) / 85) ** 2 + ((y - 5) / 72) ** 2 + (z / 75) ** 2 < 1
    lesions = ((x - 80) ** 2 + (y + 10) ** 2 + z**2 < 15**2) | ((x - 30) ** 2 + (y - 30) ** 2 + (z - 20) ** 2 < 10**2)
    body, liver, lesions = (np.broadcast_to(region, shape) for region in (body, liver, lesions))
    texture = ndimage.gaussian_filter(rng.normal(0, 1, shape).astype(np.float32), (2, 2, 0.5))
    image = np.where(body, 300.0, 10.0).astype(np.float32)
    image[liver & body] = 220.0
    image[lesions & liver] = 380.0
    image += 40 * texture + rng.normal(0, 12, shape).astype(np.float32)
    mask = (liver & body).astype(np.uint8)
    return nib.Nifti1Image(image, affine), nib.Nifti1Image(mask, affine)


def on_grid(image: nib.Nifti1Image, mask: nib.Nifti1Image, shape=(128, 128, 64)):
    """The same anatomy resampled to the preprocessed grid (trilinear image, nearest mask)."""
    zoom = np.asarray(shape) / np.asarray(image.shape)
    affine = image.affine.copy()
    affine[:3, :3] = image.affine[:3, :3] / zoom
    affine[:3, 3] = image.affine[:3, 3] + image.affine[:3, :3] @ ((1 / zoom - 1) / 2)
    data = ndimage.zoom(np.asarray(image.dataobj), zoom, order=1).astype(np.float32)
    labels = ndimage.zoom(np.asarray(mask.dataobj), zoom, order=0).astype(np.uint8)
    return nib.Nifti1Image(data, affine), nib.Nifti1Image(labels, affine)


def as_loaded(image: nib.Nifti1Image, folder: Path, name: str) -> nib.Nifti1Image:
    """Round trip through a .nii.gz: voxels in memory the way nib.load gives them (Fortran order)."""
    nib.save(image, folder / name)
    loaded = nib.load(folder / name)
    return nib.Nifti1Image(np.asanyarray(loaded.dataobj), loaded.affine, loaded.header)


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    logging.getLogger("radiomics").setLevel(logging.ERROR)  # after the import, which sets it to INFO

    with tempfile.TemporaryDirectory() as tmp:
        image, mask = (
            as_loaded(volume, Path(tmp), name)
            for volume, name in zip(synthetic_liver(), ("image.nii.gz", "mask.nii.gz"))
        )
        sitk_image, sitk_mask = hcc_radiomics.to_sitk(image), hcc_radiomics.to_sitk(mask, dtype=np.uint8)
        params = str(hcc_radiomics.PARAMS_PATH)
        ours = lambda: hcc_radiomics.extract(image, mask)  # noqa: E731
        bare = lambda: RadiomicsFeatureExtractor(params).execute(sitk_image, sitk_mask)  # noqa: E731
        extractor = RadiomicsFeatureExtractor(params)
        bare_prebuilt = lambda: extractor.execute(sitk_image, sitk_mask)  # noqa: E731
        ours(), bare()  # warm-up: imports, the cached extractor, C extensions
        # Interleaved, so that load from other processes hits all three alike.
        times = {"ours": [], "bare": [], "prebuilt": []}
        for _ in range(args.repeats):
            for name, function in (("ours", ours), ("bare", bare), ("prebuilt", bare_prebuilt)):
                times[name].append(median_seconds(function, 1))
        ours_s, bare_s, prebuilt_s = (statistics.median(times[name]) for name in ("ours", "bare", "prebuilt"))
        features = ours()
        small_image, small_mask = on_grid(image, mask)
        small_s = median_seconds(lambda: hcc_radiomics.extract(small_image, small_mask), max(1, args.repeats // 2))

    print(f"feature set {hcc_radiomics.feature_set_version()}: {len(features)} features")
    print(
        f"native {image.shape} voxels {tuple(round(float(z), 2) for z in image.header.get_zooms())} mm, liver mask "
        f"{int(np.asarray(mask.dataobj).sum())} voxels"
    )
    print(f"ours (extract, nibabel->SimpleITK included): median {ours_s:.3f} s of {args.repeats}")
    print(f"bare (RadiomicsFeatureExtractor(params).execute): median {bare_s:.3f} s of {args.repeats}")
    print(f"ratio ours/bare: {ours_s / bare_s:.3f} (goal <= 1.3)")
    print(f"bare with an extractor built once: median {prebuilt_s:.3f} s; ratio ours/that {ours_s / prebuilt_s:.3f}")
    print(
        f"preprocessed grid {small_image.shape}, liver mask {int(np.asarray(small_mask.dataobj).sum())} "
        f"voxels: median {small_s:.3f} s per extraction"
    )


if __name__ == "__main__":
    main()
