"""What `minisora plan --pretrained MODEL` and `minisora plan --released-table` print (minisora.plan_released)."""

from __future__ import annotations

from minisora.plan import GIB, GPU_CONTEXT_GIB, GPU_SLACK, on_device
from minisora.plan_released import (PRESETS, STEP_GPU, STEP_MFUS, load_released_setup, plan_released,
                                    released_step_flops, released_training_peak, step_seconds)

NAMES = {"adamw8bit": "AdamW8bit", "int8": "int8 base", "no_master": "bf16 weights (no fp32 master)",
         "checkpointing": "checkpointing", "offload": "offload", "cfg_two_calls": "CFG as two calls"}  # fmt: skip
HOW = ("config keys: a lora: section with its rank (none: full fine-tune), dit_train.optimizer=adamw8bit, "
       "pretrained.quantize=int8, pretrained.gradient_checkpointing, pretrained.dtype=float32 (fp32 master weights) "
       "or bfloat16")  # fmt: skip
MFUS = " / ".join(f"{m:.0%}" for m in STEP_MFUS)
MFU_NOTE = (f"s/step: computed from FLOPs on an {STEP_GPU.removeprefix('NVIDIA GeForce ')} (dense bf16 peak) at an "
            f"ASSUMED MFU of {MFUS}; not measured")  # fmt: skip


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def _secs(values: list[float]) -> str:
    return " / ".join(f"{v:.1f}" for v in values)


def format_released_plan(res: dict) -> str:
    """The plan of one released model and clip size as text."""
    su, (F, H0, W0), (T, H, W) = res["setup"], res["clip"], res["rounded"]
    C, t, h, w = res["latent"]
    budget = res["budget_gb"]
    mode = f"LoRA rank {su['lora_rank']} ({su['lora_params'] / 1e6:.1f} M adapter parameters)" if su["lora_rank"] else \
        "full fine-tune"  # fmt: skip
    lines = [
        f"{res['model']}: {su['params'] / 1e9:.2f} B parameters ({su['depth']} blocks, {su['hidden']} wide, "
        f"{su['heads']} heads, ffn {su['ffn']}); VAE {su['kt']}x{su['s']}x{su['s']}, {C} channels "
        f"({su['vae_params'] / 1e6:.0f} M); text {su['text_tokens']} x {su['text_dim']} "
        f"({su['text_params'] / 1e9:.2f} B, {_gib(2 * su['text_params'])} GiB bf16)",
        f"clip {F}x{H0}x{W0}" + ("" if (F, H0, W0) == (T, H, W) else f" rounded up to {T}x{H}x{W}")
        + f"; latent {C}x{t}x{h}x{w} -> {'x'.join(map(str, res['grid']))} = {res['tokens']:,} tokens "
        f"(patch {'x'.join(map(str, su['patch']))}), batch {res['batch']}"
        + ("; one timestep per token (Wan2.2 TI2V)" if su["per_token_t"] else ""),
        f"device {res['device']}, budget {budget:g} GiB: live tensors + {GPU_SLACK:.0%} allocator slack + "
        f"{GPU_CONTEXT_GIB} GiB CUDA context (both assumed)" if res["device"] == "cuda" else
        f"device cpu, budget {budget:g} GiB: live tensors x glibc's RSS factor",
        "",
        "## Caching pass (once, before training: captions, then clips; one part on the device at a time)",
        "| part | GiB on the device |", "|---|---|",
    ]  # fmt: skip
    for part, label in (("text", "text encoder (bf16), then freed"),
                        ("vae", "VAE encode (rough: not calibrated on this VAE)")):  # fmt: skip
        lines.append(f"| {label} | {_gib(res['caching'][part]['on_device'])} |")
    lines += ["", f"## Training step, {mode}: from the cache (no text encoder or VAE on the device)"]
    rows = res["training"]["rows"]
    keys = list(rows[0]["switches"])
    lines += [f"| {' | '.join(NAMES[k] for k in keys)} | peak GiB | on device GiB | fits {budget:g} GiB | "
              f"s/step at MFU {MFUS} |", "|" + "---|" * (len(keys) + 4)]  # fmt: skip
    for r in rows:
        marks = " | ".join("yes" if r["switches"][k] else "-" for k in keys)
        lines.append(f"| {marks} | {_gib(r['components']['total'])} | {_gib(r['on_device'])} | "
                     f"{'yes' if r['fits'] else 'no'} | {_secs(r['step_seconds'])} |")  # fmt: skip
    best = res["training"]["cheapest"]
    if best:
        on = [NAMES[k] for k, v in best["switches"].items() if v]
        lines += ["", f"Training: fits {budget:g} GiB with {', '.join(on) or 'no switches'} "
                      f"({_gib(best['on_device'])} GiB on the device):", "| component | GiB |",
                  "|---|---|"]  # fmt: skip
        lines += [f"| {k} | {_gib(v)} |" for k, v in best["components"].items() if k != "total"]
    else:
        lines += ["", f"Training: does not fit {budget:g} GiB with any switch: reduce frames/size/batch, or use LoRA"]
    lines += [HOW, MFU_NOTE, "", "## Sampling (classifier-free guidance, then an untiled VAE decode; bf16 weights)",
              f"| offload | CFG as two calls | peak GiB | on device GiB | fits {budget:g} GiB |",
              "|---|---|---|---|---|"]  # fmt: skip
    for r in res["sampling"]:
        sw = r["switches"]
        lines.append(f"| {'yes' if sw['offload'] else '-'} | {'yes' if sw['cfg_two_calls'] else '-'} | "
                     f"{_gib(r['components']['total'])} | {_gib(r['on_device'])} | {'yes' if r['fits'] else 'no'} |")
    lines.append(f"s/sampling step (two passes for CFG): {_secs(step_seconds(res['sample_step_flops']))} at the MFUs "
                 "above (computed); VAE decode memory is rough (not calibrated on the released VAEs)")  # fmt: skip
    return "\n".join(lines)


# ---- the 24 GB table ---------------------------------------------------------------------------
TABLE_CLIPS = (("wan2.1-t2v-1.3b", 81, 480, 832), ("wan2.2-ti2v-5b", 121, 480, 832), ("wan2.2-ti2v-5b", 121, 704, 1280),
               ("ltx-video-2b", 49, 512, 768))  # fmt: skip
TABLE_MODES = (  # (label, released_training_peak arguments); the configs/finetune/released/ modes are marked
    ("LoRA r{rank}, bf16 base, AdamW8bit (lora.yaml)", dict(lora=True, int8=False, adamw8bit=True)),
    ("LoRA r{rank}, int8 base, AdamW8bit", dict(lora=True, int8=True, adamw8bit=True)),
    ("full, bf16 weights, AdamW8bit", dict(lora=False, master=False, adamw8bit=True)),
    ("full, fp32 master, AdamW8bit (full.yaml)", dict(lora=False, master=True, adamw8bit=True)),
)
LORA_RANK = 32  # configs/finetune/released/lora.yaml's


def released_table(budget_gb: float = 24.0, rank: int = LORA_RANK) -> list[dict]:
    """Peak GiB on the device with and without checkpointing for each TABLE_CLIPS x TABLE_MODES, batch 1."""
    if rank < 1:
        raise ValueError(f"--lora-rank sets the rank of the table's LoRA rows: must be >= 1, got {rank}")
    rows = []
    for model, frames, height, width in TABLE_CLIPS:
        res = plan_released(model, frames, height, width, budget_gb=budget_gb, lora_rank=rank)
        su = load_released_setup(model, rank)
        caching = {k: v["on_device"] / GIB for k, v in res["caching"].items()}
        sampling = min(r["on_device"] for r in res["sampling"] if r["switches"]["offload"]) / GIB
        for label, args in TABLE_MODES:
            peaks = {ck: released_training_peak(su, res["tokens"], checkpointing=ck, **args) for ck in (False, True)}
            gib = {ck: on_device(p["total"], "cuda") / GIB for ck, p in peaks.items()}
            secs = step_seconds(released_step_flops(su, res["tokens"], lora=args["lora"], checkpointing=True))
            rows.append({"model": model, "clip": f"{frames}x{height}x{width}", "tokens": res["tokens"],
                         "mode": label.format(rank=rank), "gib_no_ckpt": gib[False], "gib_ckpt": gib[True],
                         "budget_gb": budget_gb, "seconds_ckpt": secs, "caching_gib": caching,
                         "sampling_offload_gib": sampling})  # fmt: skip
    return rows


def format_released_table(rows: list[dict]) -> str:
    budget = rows[0]["budget_gb"]

    def fits(r: dict) -> str:
        if r["gib_no_ckpt"] <= budget:
            return "yes"
        return "with checkpointing" if r["gib_ckpt"] <= budget else "no"

    lines = [f"| model, frames x H x W | tokens | training | GiB, no checkpointing | GiB, checkpointing | "
             f"fits {budget:g} GiB | s/step at MFU {MFUS} (checkpointing) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} {r['clip']} | {r['tokens']:,} | {r['mode']} | {r['gib_no_ckpt']:.1f} | "
                     f"{r['gib_ckpt']:.1f} | {fits(r)} | {_secs(r['seconds_ckpt'])} |")  # fmt: skip
    lines += ["", "| model, frames x H x W | caching: text encoder GiB | caching: VAE encode GiB (rough) | "
              "sampling, offloaded, GiB |", "|---|---|---|---|"]  # fmt: skip
    for r in rows[:: len(TABLE_MODES)]:
        c = r["caching_gib"]
        gib = (c["text"], c["vae"], r["sampling_offload_gib"])
        lines.append(f"| {r['model']} {r['clip']} | " + " | ".join(f"{x:.1f}" for x in gib) + " |")
    lines += ["", "All figures computed (no GPU measured them): peak live bytes + 10% allocator slack + 0.5 GiB CUDA "
              "context (assumed); batch 1; training from the latent + text cache. " + MFU_NOTE + ".",
              f"Presets: {', '.join(PRESETS)}; `minisora plan --pretrained NAME_OR_FOLDER` gives every "
              "switch."]  # fmt: skip
    return "\n".join(lines)
