"""TextEncoder: a frozen open_clip text tower (or a local T5-family encoder) that turns prompts into per-token
embeddings and a padding mask; FrozenTextEncoder is the interface every text encoder shares."""

import os
import warnings
from pathlib import Path

import open_clip
import torch
import torch.nn as nn
from open_clip.transformer import TextTransformer

# Size of the BPE vocabulary shipped inside open_clip (bpe_simple_vocab_16e6.txt.gz): 49,152 merges + 2 special tokens.
CLIP_VOCAB_SIZE = 49408


def _is_registered(model_name: str) -> bool:
    """True for an open_clip built-in config name or an explicit 'hf-hub:' / 'local-dir:' source."""
    return ":" in model_name or open_clip.get_model_config(model_name) is not None


# Checkpoint files open_clip.create_model(name, pretrained=<file>) loads: torch.save'd state dicts (read with
# weights_only=True), safetensors, and big_vision .npz (SigLIP). Used to tell a mistyped path from a tag.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz", ".npy")


def _load_error_summary(e: Exception, limit: int = 400) -> str:
    """The first lines of a (often very long) state-dict loading error."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = " ".join(lines[:3]) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def create_open_clip(model_name: str, pretrained: str | None = None, *, who: str = "open_clip",
                     **kwargs) -> nn.Module:
    """open_clip.create_model on the CPU, `pretrained` an open_clip tag or a local checkpoint file, checked first.

    A tag (e.g. "laion2b_s34b_b79k") is downloaded and cached by open_clip; a file (.pt/.bin/.safetensors of a
    whole open_clip model, both towers) is loaded as it is and nothing touches the network. A missing file, an
    unknown tag or a file that does not fit the architecture raise naming the file and the model.
    """
    if pretrained is None:
        return open_clip.create_model(model_name, device="cpu", **kwargs)
    if ":" in model_name:  # open_clip would ignore `pretrained` with only a log line
        raise ValueError(f"{who}: {model_name!r} names its own weights (open_clip 'hf-hub:'/'local-dir:' schema); "
                         f"pretrained={pretrained!r} would be ignored, set it to null")  # fmt: skip
    if open_clip.get_pretrained_cfg(model_name, pretrained):  # a tag: open_clip downloads it once
        try:
            return open_clip.create_model(model_name, pretrained=pretrained, device="cpu", **kwargs)
        except RuntimeError as e:
            raise RuntimeError(f"{who}: could not fetch open_clip weights {model_name!r} / {pretrained!r} ({e}); "
                               f"without network, download the checkpoint on another machine and set pretrained to "
                               f"its local path") from None  # fmt: skip
    path = Path(pretrained).expanduser()
    if path.is_file():
        try:
            return open_clip.create_model(model_name, pretrained=str(path), device="cpu", **kwargs)
        except Exception as e:  # torch's strict load_state_dict, safetensors and unpickling errors
            raise ValueError(
                f"{who}: {path} does not fit open_clip model {model_name!r}: {_load_error_summary(e)} (expected a "
                f"checkpoint of that whole model, image and text towers, as open_clip.create_model loads)"
            ) from None
    if path.suffix.lower() in CHECKPOINT_SUFFIXES or os.sep in pretrained or "/" in pretrained:
        raise FileNotFoundError(f"{who}: pretrained file {path} for open_clip model {model_name!r} not found")
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    raise ValueError(
        f"{who}: pretrained={pretrained!r} is neither an open_clip tag of {model_name!r} "
        f"({', '.join(tags) if tags else 'it has none'}) nor an existing checkpoint file"
    )


class FrozenTextEncoder(nn.Module):
    """The interface of every text encoder: forward(prompts) -> (emb (B, L, D) float32, mask (B, L) bool).

    Subclasses set `dim` and implement `_encode(prompts)`; the encoder always stays in eval mode, computes
    without gradients unless LoRA layers train through it, and caches the empty prompt's embedding for
    classifier-free guidance. The latent cache stores what forward returns, so the encoder can be freed before
    the denoiser trains.
    """

    def __init__(self, context_length: int):
        super().__init__()
        self._context_length = context_length
        # Empty-prompt embedding for classifier-free guidance; a non-persistent buffer so it follows .to(device).
        self.register_buffer("_null_emb", None, persistent=False)
        self.register_buffer("_null_mask", None, persistent=False)

    @property
    def dim(self) -> int:
        """Width D of the per-token embeddings."""
        raise NotImplementedError

    @property
    def context_length(self) -> int:
        """Number of token positions L of every embedding."""
        return self._context_length

    def train(self, mode: bool = True) -> "FrozenTextEncoder":
        """Always stays in eval mode: the encoder is frozen."""
        return super().train(False)

    def _warn_truncated(self, prompts: list[str], lengths: list[int]) -> None:
        """Warn about prompts longer than the context (they are truncated), naming one and its token count."""
        L = self._context_length
        truncated = [(p, n) for p, n in zip(prompts, lengths) if n > L]
        if truncated:
            first, n = truncated[0]
            first = first if len(first) <= 60 else first[:57] + "..."
            warnings.warn(
                f"{type(self).__name__}: {len(truncated)} prompt(s) longer than the {L}-token context were truncated, "
                f"e.g. {first!r} ({n} tokens); raise context_length to keep them whole",
                stacklevel=3,
            )

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts (B strings) -> emb (B, L, D) float32, mask (B, L) bool (True = real token).

        Without gradients, unless LoRA layers were added (models/lora.py): then they train through it.
        """
        if isinstance(prompts, str):
            raise TypeError(f"{type(self).__name__} expects a list of prompts, got a single string; wrap it in a list")
        trainable = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        with torch.set_grad_enabled(trainable):
            return self._encode(list(prompts))

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def null_embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding and mask (1, L, D), (1, L) of the empty prompt, computed once (classifier-free guidance)."""
        if self._null_emb is None:
            with torch.no_grad():  # a constant, even when LoRA layers train through the encoder
                self._null_emb, self._null_mask = self([""])
        return self._null_emb, self._null_mask


class TextEncoder(FrozenTextEncoder):
    """Frozen open_clip text transformer; forward(prompts) -> (emb (B, L, D) float32, mask (B, L) bool).

    model_name "tiny" (or any name open_clip does not know, with pretrained=None) builds a small randomly
    initialised text transformer from width/layers/heads with a fixed seed, so every process gets identical
    weights (latent caches and samples depend on it). A real open_clip name (e.g. "ViT-L-14") builds that
    model's text tower; `pretrained` is then an open_clip tag (e.g. "laion2b_s32b_b82k", downloaded by open_clip)
    or a local checkpoint file of the whole open_clip model (see create_open_clip). The embeddings are the final
    LayerNorm's output at every position (not the pooled vector); mask is True up to and including the end-of-text
    token. model_name "t5": a local T5-family encoder (T5 or umT5, e.g. a Wan or LTX-Video folder's) whose folder
    is `pretrained` (models/t5_text.py; width/layers/heads/seed are then unused).
    """

    def __init__(
        self,
        model_name: str = "tiny",
        pretrained: str | None = None,
        context_length: int = 32,
        width: int = 256,
        layers: int = 4,
        heads: int = 4,
        seed: int = 0,
    ):
        super().__init__(context_length)
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (start and end tokens), got {context_length}")
        self.model_name = model_name
        if model_name == "t5":
            from minisora.models.t5_text import T5TextEncoder

            if pretrained is None:
                raise ValueError("TextEncoder: model_name 't5' needs pretrained=<folder> of a T5-family encoder (a "
                                 "diffusers pipeline folder, its text_encoder/, or a transformers T5 folder)")
            self.text = T5TextEncoder(pretrained, context_length=context_length)
            self.requires_grad_(False)
            return
        registered = _is_registered(model_name)
        if not registered and pretrained is not None:
            raise ValueError(
                f"TextEncoder: model_name {model_name!r} is not an open_clip model, so pretrained={pretrained!r} "
                f"cannot be loaded; use a name from open_clip.list_models() or pretrained=None for a random tower"
            )
        if not registered and model_name != "tiny":
            warnings.warn(
                f"TextEncoder: {model_name!r} is not an open_clip model name; building a random tiny text tower "
                f"(width={width}, layers={layers}, heads={heads}). Use model_name='tiny' to silence this."
            )
        # fork_rng restores the global RNG afterwards: building the encoder never perturbs the caller's seeds.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if registered:
                self.text, self.tokenizer = self._build_open_clip(model_name, pretrained, context_length)
            else:
                self.text = TextTransformer(
                    context_length=context_length, vocab_size=CLIP_VOCAB_SIZE, width=width, heads=heads,
                    layers=layers, output_dim=None, proj_type="none",
                )
                self.tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
        self.text.output_tokens = True  # forward returns (pooled, tokens); we use the tokens
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _build_open_clip(model_name: str, pretrained: str | None,
                         context_length: int) -> tuple[TextTransformer, object]:
        cfg = open_clip.get_model_config(model_name) if ":" not in model_name else None
        if cfg is not None and cfg.get("text_cfg", {}).get("hf_model_name"):
            raise ValueError(
                f"TextEncoder: {model_name!r} uses a Hugging Face text tower; "
                f"only open_clip TextTransformer towers are supported"
            )
        # force_custom_text puts the text tower in model.text (a TextTransformer) and converts old checkpoints.
        model = create_open_clip(model_name, pretrained, who="TextEncoder", force_custom_text=True)
        text = model.text
        del model  # drops the vision tower
        if not isinstance(text, TextTransformer):
            raise ValueError(
                f"TextEncoder: {model_name!r} has a {type(text).__name__} text tower, expected TextTransformer"
            )
        if context_length > text.context_length:
            raise ValueError(
                f"TextEncoder: context_length={context_length} exceeds {model_name!r}'s {text.context_length} positions"
            )
        return text, open_clip.get_tokenizer(model_name, context_length=context_length)

    @property
    def dim(self) -> int:
        """Width D of the per-token embeddings."""
        return self.text.dim if self.model_name == "t5" else self.text.width

    def _tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        L = self._context_length
        tokens = self.tokenizer(prompts, context_length=L)  # (B, L) long
        eot = getattr(self.tokenizer, "eot_token_id", None)
        if eot is not None:
            # CLIP BPE: pad id 0 is also the token "!", so find the end token instead of comparing with pad.
            is_eot = tokens == eot  # (B, L)
            last = is_eot.int().argmax(dim=1)  # (B,) first end-of-text position
            mask = torch.arange(L)[None] <= last[:, None]  # (B, L)
            lengths = [len(self.tokenizer.encode(p)) + 2 for p in prompts]  # + start and end tokens
        else:  # other open_clip tokenizers (e.g. SigLIP's) pad with the tower's pad id
            mask = tokens != self.text.pad_id  # (B, L)
            lengths = [L if bool(m[-1]) else int(m.sum()) for m in mask]
        self._warn_truncated(prompts, lengths)
        return tokens, mask

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.model_name == "t5":
            return self.text(prompts)
        device = self.text.positional_embedding.device
        tokens, mask = self._tokenize(prompts)  # (B, L), (B, L)
        pad = self.text.context_length - tokens.shape[1]
        if pad > 0 and self.text.attn_mask is not None:
            # The tower's causal mask is sized for its full context: pad, run, crop. Being causal, the first
            # L positions do not see the padding.
            tokens = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], pad)], dim=1)  # (B, L_model)
        _, emb = self.text(tokens.to(device))  # (B, L_model, D), after the final LayerNorm
        return emb[:, : self._context_length].float(), mask.to(device)  # (B, L, D), (B, L)
