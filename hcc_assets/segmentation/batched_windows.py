"""nnU-Net's sliding-window inference with several windows per forward pass.

nnU-Net 2.x runs one window per forward pass. On a CPU, small windows spend most of their time in
the per-call overhead of the network's ~100 modules, not in arithmetic: for the test-size 2-D
model (16x64 windows, 64-256 per volume), 128 windows took 1.11 s one at a time and 0.29 s in
one batch (one thread); the demo's 160x160 windows take 103 ms one at a time, 74 ms in fours.
nnU-Net has no batch option for this, and MONAI's `sliding_window_inference` (which has one)
places and weights the windows its own way, so the masks would change. This keeps nnU-Net's own
window placement, Gaussian weighting and half-precision accumulation, in the same order, and
batches only the forward pass.
"""

from __future__ import annotations

import math

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian

# Windows per forward pass: as many as fit this many input voxels (128 of 16x64, 5 of 160x160), so
# that big windows (a 3-D patch of 32x64x64 or more) still go one at a time and memory stays near
# that of nnU-Net's own loop.
WINDOW_BATCH_VOXELS = 2**17


class BatchedWindowPredictor(nnUNetPredictor):
    """An nnUNetPredictor whose sliding window sends up to WINDOW_BATCH_VOXELS of windows at once.

    With `cpu_bf16` (set by LiverSegmenter for models trained in bfloat16 on a CPU that has it), each
    forward pass runs under CPU bfloat16 autocast, as the model trained; the logits return to
    nnU-Net's accumulation as float32 and everything after is unchanged."""

    cpu_bf16: bool = False

    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cpu_bf16:
            return super()._internal_maybe_mirror_and_predict(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return super()._internal_maybe_mirror_and_predict(x).float()

    @torch.inference_mode()
    def _internal_predict_sliding_window_return_logits(self, data, slicers, do_on_device: bool = True):
        results_device = self.device if do_on_device else torch.device("cpu")
        data = data.to(results_device)
        patch = tuple(self.configuration_manager.patch_size)
        logits = torch.zeros(
            (self.label_manager.num_segmentation_heads, *data.shape[1:]), dtype=torch.half, device=results_device
        )
        weights = torch.zeros(data.shape[1:], dtype=torch.half, device=results_device)
        gaussian = (
            compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=results_device)
            if self.use_gaussian
            else 1
        )
        per_pass = max(1, WINDOW_BATCH_VOXELS // math.prod(patch))
        for start in range(0, len(slicers), per_pass):
            windows = slicers[start : start + per_pass]
            batch = torch.stack([data[window] for window in windows]).to(self.device)
            predictions = self._internal_maybe_mirror_and_predict(batch).to(results_device)
            predictions *= gaussian  # once for the batch (broadcast over windows and classes)
            for window, prediction in zip(windows, predictions):
                logits[window] += prediction
                weights[window[1:]] += gaussian
        torch.div(logits, weights, out=logits)
        if torch.any(torch.isinf(logits)):
            raise RuntimeError("inf in the predicted logits (half-precision overflow in the window weighting)")
        return logits
