"""`minisora sample` and `minisora export` as a user runs them: files, names, defaults and bad input."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_run import build_tiny_run

from minisora import TextToVideoPipeline
from minisora.cli import main
from minisora.io import probe, read_clip

FAST = ["--steps", "2"]


@pytest.fixture(scope="session")
def root(tmp_path_factory) -> Path:
    return build_tiny_run(tmp_path_factory)


@pytest.fixture(scope="session")
def run(root) -> Path:
    return root / "runs" / "shapes"


def printed_paths(capsys) -> list[Path]:
    return [Path(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


@pytest.fixture
def written(monkeypatch) -> dict:
    """path -> frames of every video the command saves (H.264 blurs the colour noise an untrained model makes)."""
    import minisora.io

    frames = {}
    original = minisora.io.save_video

    def save_video(video, path, fps=8):
        frames[Path(path)] = video
        return original(video, path, fps)

    monkeypatch.setattr(minisora.io, "save_video", save_video)
    return frames


def test_sample_writes_one_mp4_per_prompt_named_after_it(run, tmp_path, written, capsys):
    out = tmp_path / "out"
    args = [
        "sample",
        "--ckpt",
        str(run),
        "--out",
        str(out),
        "--prompt",
        "a red circle moving left",
        "--seed",
        "4",
        "--prompt",
        "A blue square, moving UP!",
        "--frames",
        "9",
        "--height",
        "16",
        "--width",
        "24",
        "--fps",
        "12",
    ]
    assert main(args + FAST) == 0
    paths = printed_paths(capsys)
    assert paths == [out / "a-red-circle-moving-left.mp4", out / "a-blue-square-moving-up.mp4"]
    info = probe(paths[0])
    assert (info.num_frames, info.height, info.width, info.fps) == (9, 16, 24, 12)
    # The command samples what the Python API samples for the same settings: video i has seed + i.
    pipe = TextToVideoPipeline.from_pretrained(run)
    video = pipe("A blue square, moving UP!", num_frames=9, height=16, width=24, steps=2, guidance=4.0, seed=5)
    # Batched matmuls round differently from single ones, so a video sampled in a batch of two may
    # differ from the same seed sampled alone by a level or two (never more, measured).
    assert np.abs(written[paths[1]].astype(int) - video.astype(int)).max() <= 2


def test_strip_shows_every_video_as_a_row_of_frames(run, tmp_path, written, capsys):
    from PIL import Image

    strip = tmp_path / "samples.png"
    args = ["sample", "--ckpt", str(run), "--out", str(tmp_path / "out"), "--strip", str(strip)]
    assert main(args + ["--prompt", "a red circle moving left", "--prompt", "a blue square moving up"] + FAST) == 0
    assert strip in printed_paths(capsys)
    second = written[tmp_path / "out" / "a-blue-square-moving-up.mp4"]  # (T, H, W, 3), T = 17 > 9 frames shown
    image = np.asarray(Image.open(strip).convert("RGB"))
    T, H, W, _ = second.shape
    k = -(-96 // H)  # rows are scaled up (nearest) to at least 96 px
    assert image.shape == (2 * (H + 2) * k, (9 * W + 8) * k, 3)  # 9 frames, 1 px gaps between
    last = second[T - 1]  # the second row ends with the second video's last frame
    assert np.array_equal(image[(H + 2) * k : (H + 2) * k + H * k : k, -W * k :: k], last)


def test_existing_files_are_never_overwritten_silently(run, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["sample", "--ckpt", str(run), "--out", str(out), "--prompt", "a red circle moving left", *FAST]
    assert main(args + ["--seed", "0"]) == 0
    first = printed_paths(capsys)[0]
    before = first.read_bytes()
    assert main(args + ["--seed", "1", "--gif", "--prompt", "a red circle moving left"]) == 0
    assert printed_paths(capsys) == [
        out / "a-red-circle-moving-left-2.mp4",
        out / "a-red-circle-moving-left-2.gif",
        out / "a-red-circle-moving-left-3.mp4",
        out / "a-red-circle-moving-left-3.gif",
    ]
    assert first.read_bytes() == before
    assert main(args + ["--seed", "1", "--overwrite"]) == 0
    assert printed_paths(capsys) == [first] and first.read_bytes() != before


def test_make_sample_without_arguments_uses_the_default_run_and_its_prompts(root, monkeypatch, capsys):
    monkeypatch.chdir(root)  # where `make train` left runs/shapes
    assert main(["sample", *FAST]) == 0
    names = [p.name for p in printed_paths(capsys)]
    assert names == ["a-red-circle-moving-left.mp4", "a-blue-square-moving-up.mp4", "a-green-triangle-moving-right.mp4"]
    assert all((root / "samples" / n).is_file() for n in names)


def test_prompts_file_and_image_to_video(run, root, tmp_path, written, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# shapes\na green triangle moving right\n\n  a red square moving down  \n")
    first = next((root / "data" / "shapes").rglob("*.mp4"))
    image = tmp_path / "first.png"
    from PIL import Image

    Image.fromarray(read_clip(first, 1)[0]).save(image)
    out = tmp_path / "out"
    assert main(["sample", "--ckpt", str(run), "--out", str(out), "--prompts-file", str(prompts), "--image", str(image),
                 "--sampler", "heun", "--no-cfg-batch", *FAST]) == 0  # fmt: skip
    paths = printed_paths(capsys)
    assert [p.name for p in paths] == ["a-green-triangle-moving-right.mp4", "a-red-square-moving-down.mp4"]
    pipe = TextToVideoPipeline.from_pretrained(run)
    kept = pipe.decode(pipe.encode_frames(read_clip(image)))[0][0]
    for p in paths:
        assert np.abs(written[p][0].astype(int) - kept).max() <= 1


def test_extend_to_continues_the_whole_clip_window_after_window(run, root, tmp_path, written, capsys):
    """--video --extend-to 33: the clip's 17 frames as they are, then 16 new ones (two windows of 12, cut to 33), in
    either conditioning mode; the modes give different videos."""
    clip = next((root / "data" / "shapes").rglob("*.mp4"))
    start = read_clip(clip)
    videos = {}
    for mode in ("trained", "replace"):
        out = tmp_path / mode
        assert main(["sample", "--ckpt", str(run), "--out", str(out), "--prompt", "a red circle moving left",
                     "--video", str(clip), "--extend-to", "33", "--condition", mode, *FAST]) == 0  # fmt: skip
        [path] = printed_paths(capsys)
        videos[mode] = written[path]
        assert videos[mode].shape == (33, 32, 32, 3) and np.array_equal(videos[mode][:17], start)
    assert not np.array_equal(videos["trained"][17:], videos["replace"][17:])


def test_export_command_round_trip(run, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--out", str(out), "--dtype", "fp32"]) == 0
    assert printed_paths(capsys) == [out / "config.yaml", out / "model.safetensors", out / "vae.safetensors"]
    a = TextToVideoPipeline.from_pretrained(out)("a red circle moving left", steps=2, seed=9)
    b = TextToVideoPipeline.from_pretrained(run)("a red circle moving left", steps=2, seed=9)
    assert np.array_equal(a, b)
    assert main(["export", "--ckpt", str(run), "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err



def test_best_takes_the_runs_lowest_validation_checkpoint(run, tmp_path, capsys):
    best = run / "checkpoints" / "best.ckpt"  # the tiny run validates every 2 steps (training.validation)
    assert best.is_file()
    assert main(["sample", "--ckpt", str(run), "--best", "--out", str(tmp_path / "out"), *FAST]) == 0
    assert f"minisora sample: {best} on" in capsys.readouterr().err
    assert main(["export", "--ckpt", str(run), "--best", "--out", str(tmp_path / "exported")]) == 0
    capsys.readouterr()
    (tmp_path / "fresh" / "checkpoints").mkdir(parents=True)
    assert main(["sample", "--ckpt", str(tmp_path / "fresh"), "--best", "--out", str(tmp_path / "out")]) == 2
    assert "no best.ckpt" in capsys.readouterr().err

@pytest.mark.parametrize(
    "extra, message",
    [
        (["--guidance", "0.5"], "--guidance must be >= 1"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--seed", "-3"], "--seed must be >= 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--frames", "0"], "--frames must be >= 1"),
        (["--fps", "0"], "--fps must be > 0"),
        (["--keep-frames", "5"], "--keep-frames needs --video"),
        (["--image", "missing.png"], "--image missing.png: file not found"),
        (["--prompts-file", "missing.txt"], "--prompts-file missing.txt: file not found"),
        (["--video", "clip.mp4", "--keep-frames", "40"], "leaves nothing to generate"),
        (["--strip", "samples.jpg"], "--strip samples.jpg: the strip is a PNG image"),
        (["--extend-to", "49"], "--extend-to needs --video"),
        (["--video", "clip.mp4", "--keep-frames", "5", "--extend-to", "49"], "without --keep-frames"),
        (["--overlap", "2"], "--overlap needs --extend-to"),
        (["--video", "clip.mp4", "--extend-to", "9"], "extend_to must be more frames than the video's 9"),
        (["--video", "clip.mp4", "--extend-to", "33", "--overlap", "5"], "overlap must be 1 to 4 latent frames"),
    ],
)
def test_bad_values_are_one_clear_line(run, tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    if "clip.mp4" in extra:
        from minisora.io import write_video

        write_video(np.zeros((9, 32, 32, 3), np.uint8), tmp_path / "clip.mp4")
    assert main(["sample", "--ckpt", str(run), "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().splitlines()[-1].startswith("minisora sample: error:")
    assert not list((tmp_path / "out").glob("*.mp4")) if (tmp_path / "out").exists() else True


def test_bad_checkpoints_are_named(run, tmp_path, capsys):
    text = tmp_path / "notes.ckpt"
    text.write_text("hello\n")
    for ckpt, message in [
        (tmp_path / "nothing", "no such file or folder"),
        (text, "not a PyTorch/Lightning checkpoint"),
        (run / "vae" / "vae.safetensors", "autoencoder (VAE) file"),
    ]:
        assert main(["sample", "--ckpt", str(ckpt), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert str(ckpt) in err and message in err


def test_unwritable_out_fails_before_the_model_loads(run, tmp_path, monkeypatch, capsys):
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(TextToVideoPipeline, "from_pretrained", boom)
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where a folder should go")
    assert main(["sample", "--ckpt", str(run), "--out", str(blocker / "videos")]) == 2
    assert "--out" in capsys.readouterr().err


def test_errors_print_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "minisora", "sample", "--ckpt", str(tmp_path / "none.ckpt"),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "none.ckpt: no such file or folder" in r.stderr


def test_sampling_benchmark_runs_and_reports_every_variant(tmp_path):
    import json

    import torch

    from minisora.bench.sample import main as bench

    threads = torch.get_num_threads()
    try:
        assert bench(["--presets", "tiny", "--sizes", "5x32x32", "--timed", "1", "--steps", "2", "--threads", "1",
                      "--json", str(tmp_path / "bench.json")]) == 0  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    (row,) = json.loads((tmp_path / "bench.json").read_text())["speed"]
    assert row["tokens"] == 32 and row["latent"] == "8x2x8x8"
    for key in ("euler_batched", "euler_two_calls", "heun_batched", "heun_two_calls"):
        assert 0 < row[f"{key}_step_s"] and row[f"{key}_video_s"] >= 2 * row[f"{key}_step_s"] + row["decode_s"] - 0.01
