#!/usr/bin/env bash
# Device check (not CI): the study's classifier configuration (ResNet50, batch 8, SGD 0.001/0.9)
# trained for a few epochs on synthetic 128x128x64 volumes on a CUDA GPU. Prints the device, cache
# and epoch times (fp32 and mixed precision, cached and naive) and CPU/GPU agreement. 39 s on an
# H200 (2026-12-04, the install of carried wheels included), capped at 280 s. Exits 3 with a
# message when torch sees no GPU.
#   bash benchmarks/gpu_check.sh            EPOCHS=3 VOLUMES=40 to change the size
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export OMP_WAIT_POLICY=PASSIVE PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 280 "$PYTHON" - <<'PY'
import os, sys, tempfile, time

import numpy as np
import torch

if not torch.cuda.is_available():
    print(f"gpu_check: no CUDA GPU visible to torch {torch.__version__} (CUDA build {torch.version.cuda}); "
          "this check needs a GPU machine, nothing was run.", file=sys.stderr)
    sys.exit(3)

from hcc_assets.deep import ClassifierConfig, embed, load_model, save_model, train_classifier

properties = torch.cuda.get_device_properties(0)
print(f"device: {torch.cuda.get_device_name(0)}, {properties.total_memory / 2**30:.0f} GiB, "
      f"capability {properties.major}.{properties.minor}, torch {torch.__version__}, CUDA {torch.version.cuda}")

epochs, count = int(os.environ.get("EPOCHS", 3)), int(os.environ.get("VOLUMES", 40))
rng = np.random.default_rng(0)
labels = np.arange(count) % 2
volumes = rng.standard_normal((count, 128, 128, 64), dtype=np.float32)
volumes[labels == 1, 40:80, 40:80, 20:44] += 1.0  # a learnable difference
split = count * 4 // 5
train, val = (volumes[:split], labels[:split]), (volumes[split:], labels[split:])

results = {}
for name, update in [("cached fp32", {}), ("cached amp", {"amp": True}), ("naive fp32", {"use_trunk_cache": False})]:
    config = ClassifierConfig(min_epochs=epochs, max_epochs=epochs, device="cuda", **update)
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = results[name] = train_classifier(*train, *val, config)
    epoch_times = ", ".join(f"{r.train_seconds:.2f}+{r.val_seconds:.2f}" for r in result.history)
    print(f"{name}: cache {result.timings['cache_seconds']:.2f} s; epochs (train+val s) {epoch_times}; "
          f"run {time.perf_counter() - started:.1f} s; peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; "
          f"final {result.final_metrics}")

naive, cached = (min(r.train_seconds for r in results[n].history) for n in ("naive fp32", "cached fp32"))
print(f"naive/cached training epoch: {naive:.3f} s / {cached:.3f} s = {naive / cached:.1f}x")

model = results["cached fp32"].model
on_gpu = embed(model, val[0], device="cuda")
with tempfile.TemporaryDirectory() as folder:
    save_model(results["cached fp32"], folder)
    on_cpu = embed(load_model(folder).model, val[0], device="cpu")
print(f"embedding {on_gpu.shape} {on_gpu.dtype}; max |GPU - CPU after save/load| = {np.abs(on_gpu - on_cpu).max():.2e} "
      f"(TF32 convolutions: a few 1e-3)")
print("gpu_check: OK")
PY
