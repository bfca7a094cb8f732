"""ReleasedPipeline: TextToVideoPipeline over a released model (a diffusers folder, or a run that fine-tuned one).

`TextToVideoPipeline.from_pretrained(path)` comes here for:
- a diffusers folder (model_index.json): the released model as its diffusers pipeline samples it;
- a run folder whose config has a `pretrained` section (training/released_stage.py): the base folder with the
  run's LoRA (runs/NAME/lora/pytorch_lora_weights.safetensors) or fine-tuned transformer (runs/NAME/transformer/).
Sampling follows the family's diffusers pipeline (models/released.py): noise torch.randn from a CPU generator
seeded per prompt, CFG uncond + g (cond - uncond) with `negative_prompt` (default ""), and sampler "default"
(the folder's scheduler, UniPC for Wan) or "euler" (FlowMatchEuler's grid at the folder's shift).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from minisora import diffusion
from minisora.device import resolve_dtype
from minisora.pipeline import TextToVideoPipeline

# diffusers pipelines' default size (WanPipeline / LTXPipeline) and the model's frame rate, when a bare folder
# gives none
DEFAULTS = {"wan2.1-t2v": dict(num_frames=81, height=480, width=832, fps=16),
            "wan2.2-ti2v": dict(num_frames=81, height=480, width=832, fps=24),
            "ltx-video": dict(num_frames=161, height=512, width=704, fps=25)}  # fmt: skip


def run_config(path: str | Path) -> dict[str, Any] | None:
    """The run config of a released-model run folder (its config.yaml has a `pretrained` section), else None."""
    import yaml

    file = Path(path) / "config.yaml"
    if not file.is_file():
        return None
    cfg = yaml.safe_load(file.read_text()) or {}
    return cfg if isinstance(cfg, dict) and cfg.get("pretrained") else None


def is_released(path: str | Path) -> bool:
    """A diffusers folder or a released-model run folder."""
    path = Path(path)
    return path.is_dir() and ((path / "model_index.json").is_file() or run_config(path) is not None)


class ReleasedPipeline(TextToVideoPipeline):
    """A released denoiser, its VAE (DiffusersVAE) and T5 encoder behind TextToVideoPipeline's API."""

    def __init__(self, released, *, config: dict[str, Any], negative_prompt: str = "", offload: bool = False):
        data = config.get("data") or {}
        size = {**DEFAULTS[released.info.family.name], **{k: data[k] for k in ("num_frames", "height", "width")
                                                             if data.get(k)}}  # fmt: skip
        super().__init__(released.denoiser, released.vae, released.text, prediction="v", num_frames=size["num_frames"],
                         height=size["height"], width=size["width"], fps=data.get("fps") or size["fps"],
                         offload=offload, config=config)  # fmt: skip
        self.released, self.negative_prompt = released, negative_prompt

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
             offload: bool = False, lora: str | Path | None = None,
             lora_scale: float = 1.0) -> ReleasedPipeline:  # fmt: skip
        """A diffusers folder, or a released-model run (its base + adapter or transformer); `lora`: a further LoRA
        file (diffusers or ComfyUI keys) applied at lora_scale. dtype: every part's weights (default float32)."""
        import diffusers

        from minisora.models.lora import merge_lora
        from minisora.models.lora_formats import DIFFUSERS_FILE, load_released_lora
        from minisora.models.released import load_released

        path = Path(path)
        cfg = run_config(path) or {}
        base = Path(cfg["pretrained"]["path"]) if cfg else path
        name = str(resolve_dtype(dtype)).removeprefix("torch.")  # float32, bfloat16, float16
        frame_rate = (cfg.get("pretrained") or {}).get("frame_rate", 25)
        model = load_released(base, dtype=name, frame_rate=frame_rate)
        adapters = []
        if cfg.get("lora"):
            adapters.append((path / "lora" / DIFFUSERS_FILE, 1.0))
        elif cfg:
            weights = path / "transformer"
            if not (weights / "config.json").is_file():
                raise FileNotFoundError(f"{path}: a full fine-tune run writes transformer/ when it finishes; there is "
                                        f"none yet (resume the run to finish it)")  # fmt: skip
            cls_name = model.info.classes["transformer"]
            model.denoiser.transformer = getattr(diffusers, cls_name).from_pretrained(
                weights, torch_dtype=resolve_dtype(dtype)).eval()  # fmt: skip
        if lora is not None:
            adapters.append((Path(lora), lora_scale))
        for file, scale in adapters:  # one LoRA at a time, folded in: sampling runs at the base's speed
            if not file.is_file():
                raise FileNotFoundError(f"{file}: no LoRA adapter there ({path} has not written one yet?)")
            load_released_lora(file, model.denoiser, scale=scale)
            merge_lora(model.denoiser.transformer)
        model.denoiser.to(device)
        if not offload:
            model.vae.to(device)
            model.text.to(device)
        if not cfg:  # a bare folder: the family pipeline's own steps and guidance
            family = model.info.family
            cfg = {"sample": {"steps": family.steps, "guidance": family.guidance}}
        pipe = cls(model, config=cfg, offload=offload)
        pipe.checkpoint, pipe.weights = path, "ema"
        return pipe

    def save_pretrained(self, folder: str | Path, dtype: str = "fp32") -> Path:
        raise ValueError("a released model is saved as its diffusers folder (and a LoRA file), not as a minisora "
                         "export; use the base folder with the run's lora/ or transformer/")  # fmt: skip

    def _condition(self, prompts: list[str] | None, labels: list[int] | None) -> tuple[dict, dict]:
        """Prompt and negative prompt embeddings as the family's pipeline encodes them."""
        if prompts is None or labels is not None:
            raise ValueError("a released model is text-conditioned: give prompts")
        with self._on_device(self.text_encoder):
            emb, mask = self.text_encoder(prompts)  # (B, L, D), (B, L)
            null, null_mask = self.text_encoder([self.negative_prompt] * len(prompts))
        device = self.device
        return ({"context": emb.to(device), "context_mask": mask.to(device)},
                {"context": null.to(device), "context_mask": null_mask.to(device)})  # fmt: skip

    @torch.no_grad()
    def sample_latents(
        self,
        prompts: Sequence[str] | None = None,
        *,
        labels: Sequence[int] | None = None,
        num: int | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        steps: int = 25,
        guidance: float = 4.0,
        sampler: str = "euler",
        shift: float | None = None,
        seed: int | Sequence[int] = 0,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        known: torch.Tensor | None = None,
        condition: str | None = None,
        batched_cfg: bool = True,
        callback: Callable[[dict], None] | None = None,
    ) -> torch.Tensor:
        """Normalised latents (B, C, t, h, w); sampler "default" (the folder's scheduler) or "euler". `known` and
        `condition` are TextToVideoPipeline's; known frames are refused here (Wan2.2-TI2V's image-to-video:
        models.released.sample_released(image=))."""
        from minisora.models.released import SAMPLERS, sample_from_noise

        if shift is not None:
            raise ValueError("shift: a released model samples on its folder's scheduler grid (scheduler/"
                             "scheduler_config.json sets flow_shift / shift); leave shift unset")  # fmt: skip
        if known is not None:
            raise ValueError("keeping known frames (image-to-video, continuation) is not supported for released "
                             "models yet")  # fmt: skip
        diffusion.check_sampling(steps, guidance, sampler, list(SAMPLERS))  # a released model: its folder's scheduler or euler
        prompts = list(prompts or [])
        B = len(prompts)
        seeds = [seed + i for i in range(B)] if isinstance(seed, int) else list(seed)
        gens = [generator] * B if isinstance(generator, torch.Generator) else generator
        if len(seeds) != B or (gens is not None and len(gens) != B):
            raise ValueError(f"got {len(seeds)} seeds / {len(gens or seeds)} generators for {B} prompts")
        T, H, W = self.valid_size(*self._size(num_frames, height, width))
        noise = self._noise(self.latent_shape(T, H, W), seeds, gens)  # (B, C, t, h, w): diffusers' draw per seed
        cond, uncond = self._condition(prompts, labels)
        velocity = diffusion.cfg_model(self.model, guidance, cond, uncond, batched=batched_cfg)
        return sample_from_noise(self.released, velocity, noise, steps, sampler, callback)


def export_released_lora(run: str | Path, out: str | Path, format: str = "comfyui") -> Path:
    """A released LoRA run's adapter rewritten as `format` (comfyui: original-Wan keys with alpha; diffusers) to
    `out` (a .safetensors file, or a folder that gets pytorch_lora_weights.safetensors); returns the file."""
    from minisora.models.lora_formats import DIFFUSERS_FILE, load_released_lora, save_released_lora
    from minisora.models.released import load_released

    cfg = run_config(run)
    if cfg is None or not cfg.get("lora"):
        raise ValueError(f"{run}: not a LoRA run of a released model (its config.yaml has no pretrained and lora "
                         "sections); a full fine-tune's transformer/ is already a diffusers folder")  # fmt: skip
    base = cfg["pretrained"]["path"]
    denoiser = load_released(base, vae=False, text=False).denoiser  # the layers the adapter's names must fit
    load_released_lora(Path(run) / "lora" / DIFFUSERS_FILE, denoiser)
    return save_released_lora(out, denoiser, format=format, source=str(base))
