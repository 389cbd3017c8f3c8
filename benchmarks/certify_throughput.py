"""Certification throughput: cadis's engine against a straightforward reference loop.

Both certify the same test images with the same models, sigma, n0, n and alpha, in one run.
The reference is the loop of Cohen et al.'s code: one image at a time, a fixed batch of noise
draws (their default is 1000), fp32, eager, under torch.no_grad; it is measured at each
--reference-batches size, so that the gain of the engine's batch choice and the rest of the
engine show apart. The engine is `Smooth.certify_batch` as `cadis certify` runs it: the
device's default batch (100 on CPU), several images per forward when their draws fit one,
inference mode (and autocast on CUDA). Prints noise samples per second of each and the ratios.

    .venv/bin/python benchmarks/certify_throughput.py --models models/fashion-mnist
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.stats import beta, norm

from cadis.certify_models import build_denoised_classifier
from cadis.data import load_dataset
from cadis.models.devices import pick_device
from cadis.models.sources import ModelSources
from cadis.smoothing.smooth import Smooth, default_batch_size, images_per_forward


def reference_certify(base, x, num_classes, sigma, n0, n, alpha, batch):
    """Cohen-style CERTIFY of one image: fixed batches, fp32, eager, no_grad."""

    def counts(num):
        result = np.zeros(num_classes, dtype=int)
        with torch.no_grad():
            remaining = num
            while remaining > 0:
                size = min(batch, remaining)
                remaining -= size
                noisy = x.repeat(size, 1, 1, 1) + torch.randn(size, *x.shape, device=x.device) * sigma
                for p in base(noisy).argmax(1).tolist():
                    result[p] += 1
        return result

    candidate = int(counts(n0).argmax())
    n_a = int(counts(n)[candidate])
    p_lower = beta.ppf(alpha, n_a, n - n_a + 1) if n_a > 0 else 0.0
    return (candidate, sigma * norm.ppf(p_lower)) if p_lower >= 0.5 else (-1, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="models/fashion-mnist")
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--settings", default="100:10,1000:100",
                        help="n:n0 pairs to measure, e.g. 100:10 (a sweep's proxy), 1000:100")
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--reference-batches", default="1000,100",
                        help="comma-separated fixed batch sizes of the reference loop")
    parser.add_argument("--engine-batch", type=int, help="default: the device's default")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = pick_device(args.device)
    engine_batch = args.engine_batch or default_batch_size(device)
    reference_batches = [int(b) for b in args.reference_batches.split(",")]
    sources = ModelSources.resolve(args.models)
    test_set = load_dataset(sources.dataset, "test", sources.data_root)
    base = build_denoised_classifier(sources, args.sigma, device=device)
    images = torch.stack([test_set[i][0] for i in range(args.images)]).to(device)
    num_classes = test_set.info.num_classes
    print(f"device={device} threads={torch.get_num_threads()} sigma={args.sigma} "
          f"images={args.images} engine batch={engine_batch}")
    for pair in args.settings.split(","):
        n, n0 = (int(v) for v in pair.split(":"))
        samples = args.images * (n + n0)
        # Warm every path up once so that none pays one-time costs in the measurement.
        smooth = Smooth(base, num_classes, args.sigma,
                        generator=torch.Generator(device=device).manual_seed(0))
        smooth.certify(images[0], n0, n, args.alpha, engine_batch)
        group = images_per_forward(n0, n, engine_batch)
        start = time.perf_counter()
        for first in range(0, len(images), group):
            smooth.certify_batch(images[first:first + group], n0, n, args.alpha, engine_batch)
        engine_rate = samples / (time.perf_counter() - start)
        line = f"n={n:>6} n0={n0:>4}: engine {engine_rate:6.0f} samples/s"
        for batch in reference_batches:
            reference_certify(base, images[0], num_classes, args.sigma, n0, n, args.alpha, batch)
            start = time.perf_counter()
            for image in images:
                reference_certify(base, image, num_classes, args.sigma, n0, n, args.alpha, batch)
            reference_rate = samples / (time.perf_counter() - start)
            line += (f" | reference@{batch} {reference_rate:6.0f} samples/s, "
                     f"ratio {engine_rate / reference_rate:.2f}x")
        print(line, flush=True)


if __name__ == "__main__":
    main()
