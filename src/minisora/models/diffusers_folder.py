"""Read a released model's diffusers folder (the layout save_pretrained writes) and say which family it is.

A folder holds model_index.json (the pipeline class and one [library, class] pair per component) and one
subfolder per component: transformer/, vae/, text_encoder/, tokenizer/, scheduler/. `describe(folder)`
checks all of it from the JSON files alone (no weights are read), so a planner can size a model before
loading it; every problem raises FolderError naming the folder, file or key and what was expected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class FolderError(ValueError):
    """A diffusers folder that is missing, incomplete, or holds a model this version does not support."""


@dataclass(frozen=True)
class Family:
    """What minisora supports of one released model family, and the settings its diffusers pipeline uses."""

    name: str
    pipeline: str  # model_index.json's _class_name
    transformer: str  # the component classes it accepts
    vae: str
    vae_kind: str  # DiffusersVAE's kind
    text_encoder: str
    context_length: int  # tokens the pipeline encodes a prompt to (max_sequence_length)
    steps: int  # the pipeline's default num_inference_steps and guidance_scale
    guidance: float


WAN21 = Family("wan2.1-t2v", "WanPipeline", "WanTransformer3DModel", "AutoencoderKLWan", "wan", "UMT5EncoderModel",
               512, 50, 5.0)  # fmt: skip
WAN22 = Family("wan2.2-ti2v", "WanPipeline", "WanTransformer3DModel", "AutoencoderKLWan", "wan", "UMT5EncoderModel",
               512, 50, 5.0)  # fmt: skip
LTX = Family("ltx-video", "LTXPipeline", "LTXVideoTransformer3DModel", "AutoencoderKLLTXVideo", "ltx",
             "T5EncoderModel", 128, 50, 3.0)  # fmt: skip
FAMILIES = (WAN21, WAN22, LTX)
TOKENIZERS = ("T5Tokenizer", "T5TokenizerFast", "AutoTokenizer")
# The folder's own scheduler is the default sampler: diffusion.sample_scheduler runs these two (tested).
SCHEDULERS = ("UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler")
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
CONFIG_FILES = {"scheduler": "scheduler_config.json", "tokenizer": None}  # others: config.json


@dataclass(frozen=True)
class FolderInfo:
    """A checked diffusers folder: its family, component classes and configs (JSON only)."""

    path: Path
    family: Family
    classes: dict[str, str]  # component -> class name
    configs: dict[str, dict[str, Any]]  # transformer, vae, text_encoder, scheduler -> config

    @property
    def latent_channels(self) -> int:
        vae = self.configs["vae"]
        return int(vae.get("z_dim") or vae.get("latent_channels"))


def _json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FolderError(f"{path}: missing ({what})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FolderError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise FolderError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def identify(index: dict[str, Any], index_file: Path) -> Family:
    """The family of a model_index.json: the pipeline class, and for Wan whether timesteps are per token (TI2V)."""
    cls = index.get("_class_name")
    supported = "WanPipeline (Wan2.1 T2V, Wan2.2 TI2V) or LTXPipeline (LTX-Video)"
    if cls == "WanPipeline":
        second = index.get("transformer_2")
        if (second and any(second)) or index.get("boundary_ratio") is not None:
            raise FolderError(f"{index_file}: a two-expert Wan2.2 model (transformer_2, boundary_ratio) is not "
                              f"supported; expected {supported}")  # fmt: skip
        return WAN22 if index.get("expand_timesteps") else WAN21
    if cls == "LTXPipeline":
        return LTX
    raise FolderError(f"{index_file}: _class_name {cls!r} is not supported; expected {supported}")


def _component(folder: Path, index: dict[str, Any], index_file: Path, name: str, accepted: tuple[str, ...]) -> str:
    """The class of component `name`, checked against `accepted` and its subfolder's presence."""
    entry = index.get(name)
    if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
        raise FolderError(f"{index_file}: no component {name!r} (expected [library, class] with class one of "
                          f"{', '.join(accepted)})")  # fmt: skip
    cls = entry[1]
    if cls not in accepted:
        raise FolderError(f"{index_file}: {name} class {cls!r} is not supported by this version; expected "
                          f"{' or '.join(accepted)}")  # fmt: skip
    sub = folder / name
    if not sub.is_dir():
        raise FolderError(f"{folder}: component folder {name}/ is missing (model_index.json lists {name}: {cls})")
    return cls


def describe(folder: str | Path) -> FolderInfo:
    """Check a diffusers folder from its JSON files and return its family, classes and configs."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FolderError(f"{folder}: no such folder (expected a diffusers folder as save_pretrained writes it: "
                          f"model_index.json, {', '.join(c + '/' for c in COMPONENTS)})")  # fmt: skip
    index_file = folder / "model_index.json"
    index = _json(index_file, "every diffusers pipeline folder has one")
    family = identify(index, index_file)
    accepted = {"transformer": (family.transformer,), "vae": (family.vae,), "text_encoder": (family.text_encoder,),
                "tokenizer": TOKENIZERS, "scheduler": SCHEDULERS}  # fmt: skip
    classes = {name: _component(folder, index, index_file, name, accepted[name]) for name in COMPONENTS}
    configs = {
        name: _json(folder / name / (CONFIG_FILES.get(name) or "config.json"), f"the {name}'s configuration")
        for name in COMPONENTS if name != "tokenizer"
    }  # fmt: skip
    info = FolderInfo(folder, family, classes, configs)
    _check_shapes(info)
    return info


def _check_shapes(info: FolderInfo) -> None:
    """The transformer must take the VAE's latents and the text encoder's width."""
    t, folder = info.configs["transformer"], info.path
    channels = info.latent_channels
    if info.family is LTX and (t.get("patch_size", 1) != 1 or t.get("patch_size_t", 1) != 1):
        raise FolderError(f"{folder / 'transformer/config.json'}: patch_size {t.get('patch_size')}, patch_size_t "
                          f"{t.get('patch_size_t')}; LTX-Video transformers with patches other than 1 are not "
                          "supported (every released one has 1)")  # fmt: skip
    if int(t["in_channels"]) != channels or int(t.get("out_channels") or t["in_channels"]) != channels:
        raise FolderError(f"{folder / 'transformer/config.json'}: in_channels {t['in_channels']} / out_channels "
                          f"{t.get('out_channels')} do not match the VAE's {channels} latent channels "
                          f"({folder / 'vae/config.json'})")  # fmt: skip
    text_key = "caption_channels" if info.family is LTX else "text_dim"
    width = info.configs["text_encoder"].get("d_model")
    if int(t[text_key]) != width:
        raise FolderError(f"{folder / 'transformer/config.json'}: {text_key} {t[text_key]} does not match the text "
                          f"encoder's width d_model {width} ({folder / 'text_encoder/config.json'})")  # fmt: skip
    sched = info.configs["scheduler"]
    if info.classes["scheduler"] == "UniPCMultistepScheduler" and not (
        sched.get("use_flow_sigmas") and sched.get("prediction_type") == "flow_prediction"
    ):  # fmt: skip
        got = f"use_flow_sigmas {sched.get('use_flow_sigmas')}, prediction_type {sched.get('prediction_type')!r}"
        raise FolderError(f"{folder / 'scheduler/scheduler_config.json'}: a UniPC scheduler must be in flow form "
                          f"(use_flow_sigmas true, prediction_type flow_prediction), got {got}")  # fmt: skip
