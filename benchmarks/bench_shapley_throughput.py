"""Throughput of batched Kernel SHAP on small random ViTs (CPU by default).

Reports images/s and model evaluations/s of ``kernel_shap_values`` next to a plain batched forward pass over
the same number of images, so the overhead of masking, sampling and the least-squares solve is visible.

    python benchmarks/bench_shapley_throughput.py --threads 2 --images 32 --budget 150
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import VIT_MICRO16, VIT_SMALL32
from transformers import ViTConfig, ViTForImageClassification

from selfexplain.attribution.shapley import kernel_shap_values

CONFIGS = {
    # name: (ViT settings, player grid)
    "tiny-16px": ({**VIT_MICRO16, "num_labels": 3}, (4, 4)),
    "small-32px": ({**VIT_SMALL32, "num_labels": 10}, (4, 4)),
}


def best_times(functions, repeats: int) -> list[float]:
    """Fastest of ``repeats`` runs of each function; runs are interleaved so load spikes hit all alike."""
    for fn in functions:
        fn()  # warm-up
    times = [[] for _ in functions]
    for _ in range(repeats):
        for fn, spent in zip(functions, times, strict=True):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [min(spent) for spent in times]


def bench_config(name: str, settings: dict, grid: tuple[int, int], args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(num_channels=3, **settings)).to(args.device).eval()
    size = settings["image_size"]
    pixel_values = torch.randn(args.images, 3, size, size, device=args.device)
    evaluations = args.images * min(args.budget, 2 ** (grid[0] * grid[1]))
    stacked = torch.randn(evaluations, 3, size, size, device=args.device)

    def forward_only() -> None:
        with torch.inference_mode():
            for chunk in stacked.split(args.batch_size):
                model(pixel_values=chunk)
        synchronize(args.device)

    def shap() -> None:
        kernel_shap_values(model, pixel_values, grid=grid, budget=args.budget, batch_size=args.batch_size)
        synchronize(args.device)

    t_forward, t_shap = best_times([forward_only, shap], args.repeats)
    print(
        f"{name:11s} grid {grid}: kernel SHAP {args.images / t_shap:8.2f} images/s, "
        f"{evaluations / t_shap:9.0f} evals/s | forward only {evaluations / t_forward:9.0f} evals/s "
        f"| overhead {100 * (t_shap / t_forward - 1):5.1f}%"
    )


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--budget", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads, device {args.device}, budget {args.budget}, batch_size {args.batch_size}"
    )
    for name, (settings, grid) in CONFIGS.items():
        bench_config(name, settings, grid, args)


if __name__ == "__main__":
    main()
