"""`minisora eval` end to end on tiny inputs: a random tiny model (exported folder), 12 shapes clips, the
stand-in I3D TorchScript file of test_fvd and a tiny open_clip model from a local file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import open_clip
import pytest
import torch
from test_fvd import save_stand_in
from tiny_run import TINY_RUN

from minisora.checkpoint import dit_args, write_export
from minisora.cli import main
from minisora.config import kwargs, load_config, to_plain
from minisora.data.shapes import make_shapes
from minisora.models.autoencoder import VideoVAE, save_autoencoder
from minisora.models.dit import VideoDiT
from minisora.models.text import TextEncoder

ROOT = Path(__file__).resolve().parents[1]
CLIP_NAME = "minisora-test-eval-clip"
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 1},
}
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, CLIP_NAME, TINY_CLIP)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """An exported random tiny text-to-video model, its 12-clip shapes manifest, an I3D stand-in, a CLIP file."""
    root = tmp_path_factory.mktemp("eval")
    manifest = make_shapes(root / "shapes", num=12, seed=0)
    cfg = load_config(ROOT / "configs/shapes.yaml", [*TINY_RUN, f"data.path={manifest}"])
    plain = to_plain(cfg)
    torch.manual_seed(0)
    vae = VideoVAE(**kwargs(cfg.vae))
    vae_file = save_autoencoder(vae, root / "vae.safetensors")
    dit = VideoDiT(**dit_args(plain, vae.latent_channels, TextEncoder(**kwargs(cfg.text)).dim))
    with torch.no_grad():  # zero-initialised output and text projections: re-drawn so prompts and seeds matter
        for name, p in dit.named_parameters():
            if name.endswith(("final_layer.linear.weight", "cross_attn.proj.weight")):
                p.normal_(0, 0.3)
    export = write_export(root / "export", plain, dit.state_dict(), vae_file, "ema", "fp32", None)
    torch.manual_seed(1)
    clip_file = root / "clip.pt"
    torch.save(open_clip.CLIP(**TINY_CLIP).state_dict(), clip_file)
    return {"root": root, "export": export, "manifest": manifest, "clips": manifest.parent / "clips",
            "i3d": save_stand_in(root / "i3d_torchscript.pt"), "clip": clip_file}  # fmt: skip


def evaluate(tiny, tmp_path, *args: str) -> int:
    common = ["--i3d", str(tiny["i3d"]), "--frames", "16", "--size", "32", "--batch-size", "4", "--workers", "0"]
    return main(["eval", *common, *args])


def test_sampling_a_checkpoint_reports_fvd_and_clip_score_with_the_protocol(tiny, tmp_path, capsys):
    out, fake = tmp_path / "eval.json", tmp_path / "fake"
    clip = ["--clip-model", CLIP_NAME, "--clip-pretrained", str(tiny["clip"])]
    args = ["--ckpt", str(tiny["export"]), "--real", str(tiny["manifest"]), "--num", "6", "--steps", "2", *clip]
    assert evaluate(tiny, tmp_path, *args, "--out", str(out), "--save-fake", str(fake)) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    p = result["protocol"]
    assert (p["num_real"], p["num_fake"], p["frames"], p["size"], p["real_stride"]) == (6, 6, 16, 32, 1)
    assert math.isfinite(result["fvd"]) and result["fvd"] > 0
    assert 0 <= result["clip_score"]["generated"] <= 100 and 0 <= result["clip_score"]["real"] <= 100
    assert result["sampling"]["steps"] == 2 and result["sampling"]["sampled_size"] == [17, 32, 32]
    assert f"FVD {result['fvd']:.2f}  (6 real clips from {tiny['manifest']}, consecutive frames; 6 generated; " \
           f"16 frames at 32x32" in printed  # fmt: skip
    assert "fewer clips than the 400 I3D features" in printed and "CLIP score" in printed
    # the generated clips, as scored: 16 frames at 32x32, captioned with the real records' captions
    videos, captions = sorted(fake.glob("*.mp4")), sorted(fake.glob("*.txt"))
    assert len(videos) == len(captions) == 6
    real_captions = {line.split(",")[1] for line in tiny["manifest"].read_text().splitlines()[1:]}
    assert all(c.read_text().strip() in real_captions for c in captions)
    # the same command gives the same numbers
    again = tmp_path / "again.json"
    assert evaluate(tiny, tmp_path, *args, "--out", str(again)) == 0
    second = json.loads(again.read_text())
    assert second["fvd"] == pytest.approx(result["fvd"], rel=1e-9)
    assert second["clip_score"] == pytest.approx(result["clip_score"], rel=1e-9)


def test_a_folder_of_the_real_clips_themselves_scores_fvd_zero(tiny, tmp_path, capsys):
    # --fake names the same manifest: with the same seed both sides pick the same 8 clips, so every part of the
    # protocol (choice, frames, size, features, statistics) must agree and FVD is 0.
    out = tmp_path / "eval.json"
    clip = ["--clip-model", CLIP_NAME, "--clip-pretrained", str(tiny["clip"])]
    args = ["--fake", str(tiny["manifest"]), "--real", str(tiny["manifest"]), "--num", "8", *clip, "--out", str(out)]
    assert evaluate(tiny, tmp_path, *args) == 0
    result = json.loads(out.read_text())
    assert abs(result["fvd"]) < 1e-6
    assert result["clip_score"]["generated"] == pytest.approx(result["clip_score"]["real"], abs=1e-9)
    # 5 of those 8 clips against the 8: a positive distance
    assert evaluate(tiny, tmp_path, *args, "--num-fake", "5") == 0
    assert json.loads(out.read_text())["fvd"] > 1e-3
    # a folder of bare videos (no captions) is fine for FVD
    assert evaluate(tiny, tmp_path, "--fake", str(tiny["clips"]), "--real", str(tiny["manifest"]), "--num", "4",
                    "--out", str(out)) == 0  # fmt: skip
    assert json.loads(out.read_text())["protocol"]["num_fake"] == 4


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num", "50"], "12 clips listed, 50 asked; lower --num"),
        (["--num", "1"], "--num-real must be >= 2"),
        (["--frames", "40"], "none of the 12 clips could be read"),
        (["--clip-model", "ViT-B-32"], "--clip-model needs --clip-pretrained"),
        (["--i3d", "nowhere/i3d.pt"], "I3D detector nowhere/i3d.pt not found; download StyleGAN-V's"),
        (["--ckpt", "x"], "give --ckpt (sample from a model) or --fake"),
    ],
)
def test_bad_options_are_one_clear_line(tiny, tmp_path, capsys, extra, message):
    args = ["--fake", str(tiny["manifest"]), "--real", str(tiny["manifest"]), "--num", "4", *extra]
    assert evaluate(tiny, tmp_path, *args, "--out", str(tmp_path / "e.json")) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_clip_score_of_uncaptioned_videos_and_a_broken_detector_are_refused(tiny, tmp_path, capsys):
    clip = ["--clip-model", CLIP_NAME, "--clip-pretrained", str(tiny["clip"])]
    assert main(["eval", "--fake", str(tiny["clips"]), "--num", "4", *clip, "--out", str(tmp_path / "e.json")]) == 2
    assert "CLIP score needs a caption per video" in capsys.readouterr().err
    junk = tmp_path / "i3d.pt"
    junk.write_text("<html>not the file</html>")
    assert main(["eval", "--fake", str(tiny["clips"]), "--real", str(tiny["manifest"]), "--i3d", str(junk)]) == 2
    assert f"{junk}: not a TorchScript file" in capsys.readouterr().err


def test_clips_too_short_for_the_protocol_are_skipped_counted_or_refused(tiny, tmp_path, make_video, capsys):
    folder = tmp_path / "mixed"
    for i in range(6):  # 4 clips of 24 frames and 2 of 8, captioned: a caption folder
        make_video(f"mixed/{i}.mp4", num_frames=8 if i >= 4 else 24, width=48, height=32, first=10 * i)
        (folder / f"{i}.txt").write_text(f"clip {i}")
    out = tmp_path / "e.json"
    assert evaluate(tiny, tmp_path, "--fake", str(folder), "--real", str(folder), "--num", "4", "--out", str(out)) == 0
    result = json.loads(out.read_text())
    assert abs(result["fvd"]) < 1e-6  # the same 4 long clips on both sides
    assert {Path(p).name for p in result["protocol"]["real_skipped"]} <= {"4.mp4", "5.mp4"}  # only the short ones
    assert evaluate(tiny, tmp_path, "--fake", str(folder), "--real", str(folder), "--num", "5") == 2
    assert "only 4 of 6 files give a 16-frame clip at stride 1 (2 could not), 5 needed" in capsys.readouterr().err


def test_a_class_conditional_run_is_prompted_with_the_real_clips_labels(tiny, tmp_path, capsys, monkeypatch):
    from minisora.pipeline import TextToVideoPipeline

    prompted = []
    call = TextToVideoPipeline.__call__

    def spy(self, prompts, **kw):
        prompted.extend(prompts)
        return call(self, prompts, **kw)

    monkeypatch.setattr(TextToVideoPipeline, "__call__", spy)
    root = tiny["root"]
    classes = tmp_path / "classes"
    clips = sorted(tiny["clips"].glob("*.mp4"))
    for i, clip in enumerate(clips[:6]):  # two classes of three clips
        target = classes / ("MovingShapes" if i < 3 else "StillShapes") / clip.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(clip.read_bytes())
    cfg = load_config(ROOT / "configs/shapes.yaml", [*TINY_RUN, f"data.path={classes}", "data.format=classes",
                                                      "model.condition=class", "model.num_classes=2"])  # fmt: skip
    plain = to_plain(cfg)
    torch.manual_seed(0)
    export = write_export(tmp_path / "class-export", plain, VideoDiT(**dit_args(plain, 8, None)).state_dict(),
                          root / "vae.safetensors", "ema", "fp32", None)  # fmt: skip
    fake, out = tmp_path / "fake", tmp_path / "e.json"
    assert evaluate(tiny, tmp_path, "--ckpt", str(export), "--num", "4", "--steps", "1", "--save-fake", str(fake),
                    "--out", str(out)) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert result["protocol"]["real"] == str(classes)  # the run's own data.path
    assert math.isfinite(result["fvd"])
    captions = [p.read_text().strip() for p in sorted(fake.glob("*.txt"))]  # the class names, for CLIP score
    assert prompted == [{"moving shapes": "0", "still shapes": "1"}[c] for c in captions]  # the labels, for the model
    # a manifest without labels cannot prompt a class model
    capsys.readouterr()
    assert evaluate(tiny, tmp_path, "--ckpt", str(export), "--real", str(tiny["manifest"]), "--num", "4") == 2
    err = capsys.readouterr().err
    assert "class-conditioned but" in err and "real clips" not in err  # refused before any clip is read
