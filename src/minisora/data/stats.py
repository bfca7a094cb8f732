"""`minisora data-stats`: where a config's clips go before any GPU hour is spent.

Probes every file (headers only, nothing decoded) and applies the same assignment as training
(buckets.assign), so the counts printed here are the ones the run will see: clips per bucket with the
batch sizes the DiT and the autoencoder stage will use, files skipped and why, and a histogram of DiT
tokens per clip. Without a `buckets` section the one clip size of `data` is reported the same way.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from omegaconf import DictConfig

from minisora.config import kwargs
from minisora.data.buckets import Assignment, BucketError, BucketSpec, Geometry, OneSize, assign, probe_all
from minisora.data.sources import load_records, short_list


def geometry_of(cfg: DictConfig) -> Geometry:
    """The autoencoder's compression (its file when it exists, else cfg.vae) and the DiT's patch."""
    from minisora.training.run import vae_path

    path = vae_path(cfg)
    if path.is_file():
        from minisora.models.autoencoder import load_autoencoder

        return Geometry.of(load_autoencoder(path), cfg.model.patch_size)
    if cfg.get("pretrained_vae") is not None:
        raise BucketError(f"data-stats needs the autoencoder's compression: import it first with "
                          f"`minisora import-vae` (pretrained_vae: {cfg.pretrained_vae.kind}), which writes {path}")
    return Geometry.of(cfg.vae, cfg.model.patch_size)  # the VideoVAE the run will train


def data_stats(cfg: DictConfig) -> dict[str, Any]:
    """Counts per bucket, skips by reason and the token histogram, as a JSON-able dict."""
    geometry = geometry_of(cfg)
    records, rows_skipped = load_records(cfg.data.path, cfg.data.format)
    fixed = cfg.get("buckets") is None
    d = cfg.data
    spec = OneSize(d.num_frames, d.height, d.width, d.max_upscale) if fixed else BucketSpec(**kwargs(cfg.buckets))
    buckets = spec.build(geometry)
    # Training takes every record into the one size unprobed (ClipDataset skips bad ones as it meets them); here
    # every file is probed so the counts are known up front. short_policy="loop" repeats short videos.
    infos = probe_all(records)
    loop = fixed and cfg.data.short_policy == "loop"
    a: Assignment = assign(
        records, infos, buckets, max_upscale=spec.max_upscale, fps=cfg.data.fps, frame_stride=cfg.data.frame_stride,
        image_frames=bool(spec.image_fraction), any_length=loop,
    )  # fmt: skip
    dit_batch = spec.batch_sizes(buckets, cfg.latents.dit_batch_size)
    vae_batch = spec.batch_sizes(buckets, cfg.data.vae_batch_size)
    rows = []
    for b, members, frames, bd, bv in zip(buckets, a.members, a.frames, dit_batch, vae_batch):
        rows.append({"bucket": b.name, "aspect": b.aspect, "resolution": b.resolution, "clips": len(members),
                     "frames_from_videos": len(frames), "tokens": b.tokens, "dit_batch": bd, "vae_batch": bv,
                     "tokens_per_batch": bd * b.tokens})  # fmt: skip
    histogram = Counter()
    for b, members in zip(buckets, a.members):
        if members:
            histogram[b.tokens] += len(members)
    return {
        "source": str(cfg.data.path),
        "records": len(records),
        "rows_skipped": len(rows_skipped),
        "buckets": rows,
        "skipped": len(a.skipped),
        "skipped_by_reason": dict(a.reasons()),
        "skipped_examples": [f"{p}: {why}" for p, why in a.skipped[:5]],
        "token_histogram": {str(k): v for k, v in sorted(histogram.items())},
        "image_fraction": spec.image_fraction,
        "fixed_size": fixed,
    }


def format_stats(stats: dict[str, Any]) -> str:
    """The table a user reads before training."""
    lines = [f"{stats['records']} clips listed in {stats['source']} ({stats['rows_skipped']} manifest rows skipped)"]
    head = f"{'bucket':>14} {'aspect':>6} {'res':>7} {'clips':>7} {'+frames':>7} {'tokens':>7} {'DiT batch':>9} {'tokens/batch':>12} {'VAE batch':>9}"
    lines += ["", head]
    for r in stats["buckets"]:
        lines.append(
            f"{r['bucket']:>14} {r['aspect']:>6} {r['resolution']:>7} {r['clips']:>7} {r['frames_from_videos']:>7} "
            f"{r['tokens']:>7} {r['dit_batch']:>9} {r['tokens_per_batch']:>12} {r['vae_batch']:>9}"
        )
    used = sum(r["clips"] for r in stats["buckets"])
    lines.append(f"{used} clips in {sum(r['clips'] > 0 for r in stats['buckets'])} of {len(stats['buckets'])} buckets; "
                 f"{stats['skipped']} skipped")  # fmt: skip
    if stats["image_fraction"] is not None:
        lines.append(f"image_fraction {stats['image_fraction']:g}: '+frames' videos also give one frame to a 1-frame bucket")
    if stats["skipped"]:
        reasons = ", ".join(f"{why}: {n}" for why, n in sorted(stats["skipped_by_reason"].items(), key=lambda x: -x[1]))
        lines += ["", f"skipped ({reasons}), e.g. {short_list(stats['skipped_examples'])}"]
    hist = stats["token_histogram"]
    if hist:
        lines += ["", "DiT tokens per clip:"]
        top = max(hist.values()) or 1
        for tokens, n in hist.items():
            lines.append(f"{tokens:>8} {'#' * max(1 if n else 0, round(40 * n / top)):<40} {n}")
    return "\n".join(lines)
