"""Classifier epoch time: naive (frozen trunk re-run every step) vs frozen-trunk cache.

Runs the real `train_classifier` both ways on synthetic 128x128x64 volumes (depth 50, batch 8) and
compares the training part of an epoch; the cache build is reported separately. Target: >= 8x.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/classifier_epoch.py [--threads 2]
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: busy-waiting OpenMP is ~10x slower here

import argparse
import time

import numpy as np
import torch

from hcc_assets.deep import ClassifierConfig, train_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=32, help="training volumes (4 batches of 8 by default)")
    parser.add_argument("--val-volumes", type=int, default=2, help="kept small: validation is not what is measured")
    parser.add_argument("--shape", type=int, nargs=3, default=(128, 128, 64))
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=2, help="per path; the fastest epoch is reported")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    volumes = rng.standard_normal((args.volumes + args.val_volumes, *args.shape), dtype=np.float32)
    labels = np.arange(len(volumes)) % 2
    split = args.volumes
    print(
        f"depth {args.depth}, {args.volumes} training + {args.val_volumes} validation volumes {tuple(args.shape)}, "
        f"batch 8, device {args.device}, torch threads {torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
    )

    results = {}
    for cached in (False, True):
        config = ClassifierConfig(
            depth=args.depth, min_epochs=args.epochs, max_epochs=args.epochs, use_trunk_cache=cached
        )
        started = time.perf_counter()
        result = train_classifier(
            volumes[:split], labels[:split], volumes[split:], labels[split:], config, device=args.device
        )
        epoch_seconds = [record.train_seconds for record in result.history]
        results[cached] = min(epoch_seconds)
        name = "cached" if cached else "naive "
        print(
            f"{name} training epochs (s): {', '.join(f'{s:.2f}' for s in epoch_seconds)}; "
            f"validation per epoch {np.mean([r.val_seconds for r in result.history]):.2f} s; "
            f"whole run {time.perf_counter() - started:.1f} s"
        )
        if cached:
            cache_seconds = result.timings["cache_seconds"]
            print(f"cached trunk build (once, {split + args.val_volumes} volumes): {cache_seconds:.2f} s")

    ratio = results[False] / results[True]
    print(
        f"naive epoch {results[False]:.2f} s, cached epoch {results[True]:.2f} s: {ratio:.1f}x faster "
        f"({'meets' if ratio >= 8 else 'MISSES'} the 8x target)"
    )


if __name__ == "__main__":
    main()
