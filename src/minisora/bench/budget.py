"""The consumer-GPU budget: on a bigger GPU capped to 24 GiB, the largest clip and batch each preset trains on.

    minisora bench budget [--presets S B] [--budget-gb 24] [--json OUT]        (needs a CUDA GPU)

The process is capped with torch.cuda.set_per_process_memory_fraction, so an H100 or H200 behaves like an
RTX 4090 for allocation purposes. Training: for each preset and clip size, the largest batch (doubling, then
bisecting) whose bf16 + AdamW8bit step runs without running out of memory, with gradient checkpointing off
and on. Sampling: for each preset, the longest 480p video (in latent frames) that samples with bf16,
offloading and a tiled VAE. Results feed `minisora plan`'s calibration (GPU context and allocator slack).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from minisora.bench.report import parse_size, write_json

TRAIN_CLIPS = ["17x256x256", "33x256x256", "17x512x512", "33x480x848"]
SAMPLE_SIZE = (480, 848)


def largest_fitting(fits: Callable[[int], bool], start: int = 1, limit: int = 1024) -> int:
    """The largest n in [start, limit] with fits(n), assuming fits is monotone (True up to some n); 0 if none.

    Doubles from `start` until a failure, then bisects between the last success and the failure, so a
    search costs about 2 log2(n) trials (each a real step that may run out of memory).
    """
    if not fits(start):
        return 0
    good, bad = start, None
    while bad is None:
        nxt = min(good * 2, limit)
        if nxt == good:
            return good
        if fits(nxt):
            good = nxt
        else:
            bad = nxt
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def _oom_safe(trial: Callable[[], None]) -> bool:
    """Run one trial; False if it ran out of GPU memory (the cache is emptied either way)."""
    try:
        trial()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()


def cap_memory(budget_gb: float, device: torch.device) -> float:
    """Cap this process at budget_gb GiB of the device's memory; returns the fraction used."""
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, budget_gb * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


def train_search(preset: str, clip: str, device: torch.device, checkpointing: bool) -> dict:
    from minisora.bench.train import latent_shape, measure_step
    from minisora.bench.train import preset as preset_args

    latent = latent_shape(*parse_size(clip))
    args = preset_args(preset)

    def fits(batch: int) -> bool:
        return _oom_safe(lambda: measure_step(args, latent, batch, grad_checkpointing=checkpointing, device=device,
                                              precision="bf16", reps=1, warmup=0, optimizer="adamw8bit"))  # fmt: skip

    batch = largest_fitting(fits)
    return {"preset": preset, "clip": clip, "grad_checkpointing": checkpointing, "max_batch": batch}


def sample_search(preset: str, device: torch.device) -> dict:
    """The most latent frames (video frames = 1 + 4 * (n - 1)) of 480p that sample with bf16 + offload + tiling."""
    from minisora.bench.sample import build

    H, W = SAMPLE_SIZE

    def fits(latent_frames: int) -> bool:
        frames = 1 + 4 * (latent_frames - 1)

        def trial() -> None:
            pipe, _ = build(preset, (frames, H, W), dtype=torch.bfloat16)
            pipe.model.to(device)  # text encoder and VAE stay on the CPU until used (offload), as `--offload`
            pipe.offload = True
            with torch.no_grad():
                pipe("a test prompt", num_frames=frames, height=H, width=W, steps=2, guidance=4.0, seed=0)

        return _oom_safe(trial)

    n = largest_fitting(fits, start=1, limit=256)
    return {"preset": preset, "size": [H, W], "max_latent_frames": n, "max_frames": 1 + 4 * (n - 1) if n else 0}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="minisora bench budget", description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["S", "B"])
    p.add_argument("--clips", nargs="+", default=TRAIN_CLIPS)
    p.add_argument("--budget-gb", type=float, default=24.0)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("the 24 GiB budget search needs a CUDA GPU (on CPU, `minisora plan` predicts the same figures)")
    device = torch.device("cuda")
    fraction = cap_memory(args.budget_gb, device)
    results: dict = {"device": torch.cuda.get_device_name(device), "budget_gb": args.budget_gb,
                     "memory_fraction": fraction, "train": [], "sample": []}  # fmt: skip
    for preset in args.presets:
        for clip in args.clips:
            for ckpt in (False, True):
                r = train_search(preset, clip, device, ckpt)
                results["train"].append(r)
                print(f"{preset} {clip} checkpointing={ckpt}: largest batch {r['max_batch']}", flush=True)
        r = sample_search(preset, device)
        results["sample"].append(r)
        print(f"{preset}: longest 480p video that samples: {r['max_frames']} frames", flush=True)
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
