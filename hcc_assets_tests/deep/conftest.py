import numpy as np
import pytest

# Tiny geometry: conv1..layer4 halve it five times, so 32x32x16 still reaches layer4.
SHAPE = (32, 32, 16)


def blob_cohort(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise volumes, every second one with a bright block: separable on purpose."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    volumes = rng.normal(size=(count, *SHAPE)).astype(np.float32)
    volumes[labels == 1, 10:22, 10:22, 4:12] += 2.0
    return volumes, labels


@pytest.fixture(scope="session")
def train_cohort():
    return blob_cohort(16, seed=1)


@pytest.fixture(scope="session")
def val_cohort():
    return blob_cohort(8, seed=2)
