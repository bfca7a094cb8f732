"""Tiny random-weight released-model folders (Wan2.1 T2V, Wan2.2 TI2V, LTX-Video) for the tests/test_released_*.py.

Each folder is what the real pipeline class's save_pretrained writes (model_index.json, transformer/, vae/,
text_encoder/, tokenizer/, scheduler/), from tiny instances of the real classes: nothing is downloaded. The
transformers' output layers are re-drawn (a zero or near-zero output would make every parity test pass), the
VAEs carry distinctive latent statistics, and the tokenizer is a T5Tokenizer built from a word list.
"""

from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("a red green blue circle square triangle moving left right up down slowly quickly on the black white "
         "background small large cat dog runs jumps over under bright dark").split()  # fmt: skip
PROMPT = "a red circle moving left on the black background"
NEGATIVE = "blurry dark"
TEXT_DIM = 32  # d_model of the tiny T5/umT5
# family -> what its tiny folder generates: (frames, height, width) of the video, and the pipeline's extra args
CLIPS = {"wan21": (9, 32, 32), "wan22": (9, 64, 64), "ltx": (17, 64, 64)}
FAMILIES = tuple(CLIPS)


def tokenizer():
    """A T5Tokenizer over WORDS (no sentencepiece file: transformers builds it from the word list)."""
    from transformers import T5Tokenizer

    words = [("\u2581" + w, -1.0 - 0.01 * i) for i, w in enumerate(WORDS)]  # "\u2581": sentencepiece's word start
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + words
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def text_encoder(kind: str, seed: int):
    """A tiny UMT5EncoderModel (Wan) or T5EncoderModel (LTX), dropout 0."""
    import transformers

    torch.manual_seed(seed)
    cls, config = {"umt5": (transformers.UMT5EncoderModel, transformers.UMT5Config),
                   "t5": (transformers.T5EncoderModel, transformers.T5Config)}[kind]  # fmt: skip
    cfg = config(vocab_size=len(WORDS) + 3, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                 decoder_start_token_id=0)  # fmt: skip
    return cls(cfg).eval()


def _redraw_outputs(model: torch.nn.Module, seed: int) -> None:
    """Seeded larger weights for the output projection, the cross-attention (so that the prompt moves the output
    well above the parity tolerance) and any all-zero tensor of a random transformer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("proj_out") or ".attn2." in name or not p.abs().max() > 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def wan_parts(ti2v: bool, seed: int = 0) -> dict:
    """Components of a tiny WanPipeline: Wan2.1 T2V (16 latent channels, VAE 4x8x8) or Wan2.2 TI2V (48, 4x16x16)."""
    import diffusers

    torch.manual_seed(seed)
    C = 48 if ti2v else 16
    if ti2v:  # Wan2.2's VAE: residual blocks, 2x2 patchify inside, 16x spatial compression
        vae = diffusers.AutoencoderKLWan(
            base_dim=8, decoder_base_dim=8, z_dim=C, dim_mult=[1, 2, 2, 2], num_res_blocks=1, is_residual=True,
            in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
            latents_mean=[0.05 * (i % 7) - 0.15 for i in range(C)], latents_std=[0.5 + 0.1 * (i % 5) for i in range(C)],
        )  # fmt: skip
    else:
        vae = diffusers.AutoencoderKLWan(
            base_dim=8, z_dim=C, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
            latents_mean=[0.1 * (i % 5) - 0.2 for i in range(C)], latents_std=[0.6 + 0.2 * (i % 4) for i in range(C)],
        )  # fmt: skip
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=C, out_channels=C,
        text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    )  # fmt: skip
    _redraw_outputs(transformer, seed + 1)
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=5.0 if ti2v else 3.0)  # fmt: skip
    return dict(transformer=transformer.eval(), vae=vae.eval(), text_encoder=text_encoder("umt5", seed + 2),
                tokenizer=tokenizer(), scheduler=scheduler)  # fmt: skip


def ltx_parts(seed: int = 0) -> dict:
    """Components of a tiny LTXPipeline (LTX-Video 0.9.1's token-dependent shift, VAE 8x32x32 with 8 channels)."""
    import diffusers

    torch.manual_seed(seed)
    C = 8
    vae = diffusers.AutoencoderKLLTXVideo(
        block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), latent_channels=C, scaling_factor=1.5,
    )  # fmt: skip
    vae.latents_mean.copy_(torch.linspace(-0.3, 0.4, C))
    vae.latents_std.copy_(torch.linspace(0.5, 2.0, C))
    transformer = diffusers.LTXVideoTransformer3DModel(
        in_channels=C, out_channels=C, num_attention_heads=2, attention_head_dim=12, cross_attention_dim=24,
        num_layers=2, caption_channels=TEXT_DIM,
    )  # fmt: skip
    _redraw_outputs(transformer, seed + 1)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024, max_image_seq_len=4096,
        shift_terminal=0.1,
    )  # fmt: skip
    return dict(transformer=transformer.eval(), vae=vae.eval(), text_encoder=text_encoder("t5", seed + 2),
                tokenizer=tokenizer(), scheduler=scheduler)  # fmt: skip


def pipeline(family: str, seed: int = 0):
    """A tiny diffusers pipeline of `family` (wan21, wan22, ltx)."""
    import diffusers

    if family == "ltx":
        return diffusers.LTXPipeline(**ltx_parts(seed))
    return diffusers.WanPipeline(**wan_parts(family == "wan22", seed), expand_timesteps=family == "wan22")


def build_folder(root: Path, family: str, seed: int = 0) -> Path:
    """root/family written by the pipeline's own save_pretrained; returns the folder."""
    out = Path(root) / family
    pipeline(family, seed).save_pretrained(out)
    return out
