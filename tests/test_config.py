"""Config loading: schema from constructor signatures, merge order, errors that name key and file."""

import inspect
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from minisora.config import ConfigError, _sections, kwargs, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_sections_mirror_constructor_signatures():
    cfg = load_config()
    for section, (cls, skip) in _sections().items():
        fn = cls.__init__ if isinstance(cls, type) else cls
        params = [n for n in inspect.signature(fn).parameters if n not in ("self", *skip)]
        assert list(cfg[section].keys()) == params, section


def test_every_shipped_config_loads_and_builds_its_data_section():
    files = sorted((ROOT / "configs").rglob("*.yaml"))
    assert files, "no configs shipped"
    for f in files:
        if f.parent.name == "model":  # presets are base files, merged into experiments
            continue
        if f.name == "lora.yaml":  # a LoRA fine-tune needs its base (tests/test_finetune.py loads it with one)
            with pytest.raises(ConfigError, match="LoRA fine-tunes a trained model; set init_from="):
                load_config(f)
            continue
        try:
            cfg = load_config(f)
        except ConfigError as e:  # released-model fine-tunes: the downloaded folder and the clips are the user's
            assert str(e).endswith("required keys not set: pretrained.path") or (
                f.parent.name == "released" and "required keys not set" in str(e)), f  # fmt: skip
            cfg = load_config(f, ["pretrained.path=DIR", "data.path=clips.csv"])
        assert cfg.data.num_frames >= 1


def test_merge_order_base_experiment_overrides(tmp_path):
    write(tmp_path, "base.yaml", "data:\n  height: 64\n  width: 64\nmodel:\n  depth: 3\n")
    exp = write(tmp_path, "exp.yaml", "base: base.yaml\nname: exp\ndata:\n  width: 48\n")
    cfg = load_config(exp, ["data.vae_batch_size=3", "model.depth=5"])
    assert (cfg.name, cfg.data.height, cfg.data.width, cfg.data.vae_batch_size, cfg.model.depth) == ("exp", 64, 48, 3, 5)
    assert cfg.trainer.max_steps == 1000  # schema default survives


def test_unknown_key_names_key_and_file(tmp_path):
    exp = write(tmp_path, "exp.yaml", "data:\n  num_frame: 16\n")
    with pytest.raises(ConfigError) as e:
        load_config(exp)
    msg = str(e.value)
    assert "exp.yaml" in msg and "data.num_frame" in msg and "num_frames" in msg  # valid keys listed


def test_wrong_type_names_key_and_file(tmp_path):
    exp = write(tmp_path, "exp.yaml", "trainer:\n  max_steps: lots\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml.*trainer\.max_steps"):
        load_config(exp)


def test_bad_override_is_reported_as_command_line():
    with pytest.raises(ConfigError, match=r"command line.*data\.height"):
        load_config(None, ["data.height=tall"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["data.height"])
    with pytest.raises(ConfigError, match=r"unknown key 'nope'"):
        load_config(None, ["nope=1"])


def test_yaml_is_data_only(tmp_path):
    marker = tmp_path / "pwned"
    exp = write(tmp_path, "evil.yaml", f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="evil.yaml"):
        load_config(exp)
    assert not marker.exists()


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "list.yaml", "- 1\n- 2\n"))


def test_bases_nest_and_a_cycle_names_its_files(tmp_path):
    write(tmp_path, "b.yaml", "seed: 1\ntrainer: {max_steps: 5, log_every_n_steps: 2}\n")
    write(tmp_path, "a.yaml", "base: b.yaml\ntrainer: {max_steps: 6}\n")
    cfg = load_config(write(tmp_path, "exp.yaml", "base: a.yaml\ntrainer: {log_every_n_steps: 3}\n"))
    assert (cfg.seed, cfg.trainer.max_steps, cfg.trainer.log_every_n_steps) == (1, 6, 3)  # b <- a <- exp
    write(tmp_path, "b.yaml", "base: exp.yaml\n")
    with pytest.raises(ConfigError, match=r"exp.yaml: 'base' files form a cycle: .*exp.yaml -> .*a.yaml -> .*b.yaml -> .*exp.yaml"):
        load_config(tmp_path / "exp.yaml")
    with pytest.raises(ConfigError, match="exp2.yaml: base file 'nope.yaml' not found"):
        load_config(write(tmp_path, "exp2.yaml", "base: nope.yaml\n"))


@pytest.mark.parametrize("layer, new", [
    ("dit_train: {schedule: cosine}", "dit_train.lr_schedule"),
    ("sample: {shapes_eval: true}", "shapes_eval"),
    ("sample: {samples_per_prompt: 2}", "shapes_eval.samples_per_prompt"),
    ("data: {batch_size: 4}", "data.vae_batch_size"),
    ("latents: {batch_size: 4}", "latents.dit_batch_size"),
])  # fmt: skip
def test_a_renamed_key_names_its_new_name(tmp_path, layer, new):
    old = layer.replace(": {", ".").split(":")[0]
    with pytest.raises(ConfigError, match=f"old.yaml: '{old}' was renamed; use {new}"):
        load_config(write(tmp_path, "old.yaml", layer + "\n"))
    key, value = old, layer.split(": ")[-1].rstrip("}")
    with pytest.raises(ConfigError, match=rf"command line \({key}\): '{old}' was renamed; use {new}"):
        load_config(None, [f"{key}={value}"])


def test_stage_seeds_follow_the_top_level_seed_unless_set():
    cfg = load_config(ROOT / "configs" / "shapes.yaml", ["seed=7", "latents.seed=3"])
    seeds = {s: cfg[s].seed for s in ("data", "text", "latents", "dit_train", "sample", "shapes")}
    assert seeds == {"data": 7, "text": 7, "latents": 3, "dit_train": 7, "sample": 7, "shapes": 7}


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs" / "shapes.yaml", ["trainer.max_steps=7"])
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(out)
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)
    assert again.trainer.max_steps == 7


def test_kwargs_are_plain_python():
    args = kwargs(load_config(ROOT / "configs" / "shapes.yaml").model)
    assert isinstance(args["patch_size"], list) and all(isinstance(v, int) for v in args["patch_size"])
