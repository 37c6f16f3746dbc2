import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage


def textured_liver(shape=(40, 40, 12), spacing=(4.0, 4.0, 8.0), affine=None, seed=0):
    """Float32 image with a textured ellipsoid 'liver' (~3000 voxels) and its uint8 mask."""
    rng = np.random.default_rng(seed)
    if affine is None:
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = [-80.0, -70.0, -40.0]
    i, j, k = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in shape), indexing="ij")
    liver = (i / 15) ** 2 + (j / 12) ** 2 + (k / 5) ** 2 < 1
    texture = ndimage.gaussian_filter(rng.normal(size=shape), 1.0)
    image = (100 + 60 * liver + 25 * texture + rng.normal(0, 5, shape)).astype(np.float32)
    return nib.Nifti1Image(image, affine), nib.Nifti1Image(liver.astype(np.uint8), affine)


@pytest.fixture(scope="session")
def liver_volume():
    return textured_liver()
