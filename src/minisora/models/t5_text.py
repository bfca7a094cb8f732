"""T5TextEncoder: a local T5-family encoder (T5, umT5) behind minisora's text-encoder interface.

The released video models condition on T5 embeddings, each pipeline in its own way (checked against
diffusers 0.42, transformers 5.x):
- WanPipeline (umT5-XXL, 512 tokens): cleans the prompt (ftfy, HTML entities, whitespace), runs the encoder
  with the padding mask, cuts the embeddings to the prompt's length and pads them back with zeros; its
  cross-attention has no mask, so those zeros are part of the input.
- LTXPipeline (T5-XXL, 128 tokens): runs the encoder without the mask (the pad tokens are encoded too) and
  passes the mask to its transformer.
`mask_encoder`, `zero_pad` and `clean` choose between them; the defaults (masked, zero-padded) suit any
model that takes a mask, minisora's VideoDiT included. Both XXL encoders are ~9-11 GiB in bf16: encode the
captions once into the latent cache, then free the encoder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from minisora.device import resolve_dtype
from minisora.models.text import FrozenTextEncoder

# transformers' config model_type -> the encoder-only class that loads it.
ENCODER_CLASSES = {"t5": "T5EncoderModel", "umt5": "UMT5EncoderModel"}
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


def find_t5_folders(path: str | Path) -> tuple[Path, Path]:
    """(encoder folder, tokenizer folder) of `path`: a diffusers pipeline folder (text_encoder/ + tokenizer/), its
    text_encoder/ (tokenizer/ beside it), or one transformers folder holding both; FileNotFoundError naming what
    is missing otherwise."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"T5 text encoder: {root} is not a folder (expected a diffusers pipeline folder with "
                                "text_encoder/ and tokenizer/, or a transformers T5/umT5 folder)")  # fmt: skip
    for encoder, tokenizer in ((root / "text_encoder", root / "tokenizer"), (root, root.parent / "tokenizer"),
                               (root, root)):  # fmt: skip
        if (encoder / "config.json").is_file() and any((tokenizer / f).is_file() for f in TOKENIZER_FILES):
            return encoder, tokenizer
    if not (root / "config.json").is_file() and not (root / "text_encoder" / "config.json").is_file():
        raise FileNotFoundError(f"T5 text encoder: {root} holds neither config.json nor text_encoder/config.json")
    raise FileNotFoundError(f"T5 text encoder: no tokenizer for {root} (looked for one of {', '.join(TOKENIZER_FILES)} "
                            f"in {root}, {root / 'tokenizer'} and {root.parent / 'tokenizer'})")  # fmt: skip


def encoder_class(folder: Path):
    """The transformers encoder class for the config.json in `folder`; ValueError for a model that is not T5/umT5."""
    import transformers

    config_file = folder / "config.json"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    if model_type not in ENCODER_CLASSES:
        raise ValueError(f"{config_file}: model_type {model_type!r} is not a T5-family encoder; expected one of "
                         f"{', '.join(ENCODER_CLASSES)}")  # fmt: skip
    return getattr(transformers, ENCODER_CLASSES[model_type])


class T5TextEncoder(FrozenTextEncoder):
    """A frozen T5/umT5 encoder from a local folder; forward(prompts) -> (emb (B, L, D) float32, mask (B, L) bool).

    path: see find_t5_folders. context_length: tokens L (Wan 512, LTX-Video 128). mask_encoder: run the
    encoder with the padding mask. zero_pad: zero the embeddings past each prompt. clean: WanPipeline's
    prompt cleaning. dtype: weights (auto: bfloat16 with a CUDA GPU, else float32). Or pass a loaded
    `model` and `tokenizer` (what the diffusers folder reader does).
    """

    def __init__(self, path: str | Path | None = None, context_length: int = 512, mask_encoder: bool = True,
                 zero_pad: bool = True, clean: bool = False, dtype: str = "float32", model=None,
                 tokenizer=None) -> None:  # fmt: skip
        super().__init__(context_length)
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (prompt and end token), got {context_length}")
        if model is None or tokenizer is None:
            if path is None:
                raise ValueError("T5TextEncoder needs a folder (path) or a loaded model and tokenizer")
            from transformers import AutoTokenizer

            encoder_dir, tokenizer_dir = find_t5_folders(path)
            model = encoder_class(encoder_dir).from_pretrained(encoder_dir, dtype=resolve_dtype(dtype),
                                                               local_files_only=True)  # fmt: skip
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        self.model, self.tokenizer = model, tokenizer
        self.mask_encoder, self.zero_pad, self.clean = mask_encoder, zero_pad, clean
        self.source = None if path is None else str(path)
        self.requires_grad_(False)
        self.eval()

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.clean:  # WanPipeline's own cleaning (ftfy when installed, HTML entities, whitespace)
            from diffusers.pipelines.wan.pipeline_wan import prompt_clean

            prompts = [prompt_clean(p) for p in prompts]
        L = self._context_length
        self._warn_truncated(prompts, [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=True).input_ids])
        tokens = self.tokenizer(prompts, padding="max_length", max_length=L, truncation=True, add_special_tokens=True,
                                return_attention_mask=True, return_tensors="pt")  # fmt: skip
        device = next(self.model.parameters()).device
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)  # (B, L) each
        emb = self.model(input_ids=ids, attention_mask=mask if self.mask_encoder else None).last_hidden_state
        mask = mask.bool()  # (B, L)
        if self.zero_pad:  # WanPipeline: embeddings cut to the prompt's length, zero-padded back to L
            emb = torch.where(mask[..., None], emb, torch.zeros((), dtype=emb.dtype, device=device))
        return emb.float(), mask  # (B, L, D), (B, L)
