"""The typed config tree: TOML + dotted overrides, and errors that name the key and what is allowed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from framer_dist.config import (Config, ConfigError, FramerConfig, config_from_dict, dump_toml, load_config,
                                parse_override)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.toml"))


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_match_framer_spec():
    f = load_config().framer
    assert (f.mask, f.radius, f.cutoff, f.tau, f.weight, f.layer_reduce) == ("radial", 0.2, 0.2, 1.0, 0.1, "mean")
    assert (f.faw, f.fam, f.faw_denominator, f.random_negatives, f.in_batch_negatives) == (
        True, True, "student", True, True)
    assert (f.students, f.teacher_layer, f.feature, f.lf_loss, f.hf_loss) == ("all_but_last", -1, "x0", "intra", "inter")
    assert (f.enabled, f.plain_l2, f.nonfinite, f.use_rfft) == (True, False, "error", True)
    assert {s.name for s in dataclasses.fields(Config)} >= {
        "model", "data", "framer", "train", "parallel", "checkpoint", "log"}


def test_toml_and_overrides(tmp_path):
    p = _write(tmp_path, "[framer]\nradius = 0.3\nmask = 'teacher_quantile'\n[train]\nlr = 1e-4\n")
    cfg = load_config(p, ["framer.radius=0.1", "framer.faw=false", "train.steps=7",
                          "framer.students=[0, 2, 4]", "train.out_dir=runs/x y"])
    assert cfg.framer.radius == 0.1  # override wins over the file
    assert cfg.framer.mask == "teacher_quantile" and cfg.train.lr == 1e-4
    assert cfg.framer.faw is False and cfg.train.steps == 7 and cfg.framer.students == [0, 2, 4]
    assert cfg.train.out_dir == "runs/x y"  # not a TOML literal: read as a string
    assert isinstance(load_config(None, ["framer.radius=1"]).framer.radius, float)  # int widens


@pytest.mark.parametrize("override,match", [
    ("framer.radious=0.1", r"unknown config key 'framer.radious' \(did you mean 'radius'\?\)"),
    ("framr.radius=0.1", r"unknown config key 'framr'"),
    ("radius=0.1", r"expected section.key=value"),
    ("framer.radius", r"not of the form section.key=value"),
    ("framer.radius=-0.1", r"'framer.radius': -0.1 is below the minimum 0.0"),
    ("framer.cutoff=1.5", r"'framer.cutoff': 1.5 is above the maximum 1.0"),
    ("framer.tau=0", r"'framer.tau': 0.0 is below the minimum"),
    ("framer.mask='disc'", r"'framer.mask': 'disc' is not allowed; allowed values: 'radial', 'teacher_quantile'"),
    ("framer.layer_reduce='max'", r"allowed values: 'mean', 'sum'"),
    ("framer.faw_denominator='both'", r"allowed values: 'student', 'teacher', 'none'"),
    ("framer.faw=1", r"'framer.faw': expected true/false, got 1"),
    ("framer.teacher_layer=1.5", r"'framer.teacher_layer': expected an integer"),
    ("framer.teacher_layer=true", r"'framer.teacher_layer': expected an integer"),
    ("framer.radius='big'", r"'framer.radius': expected a number"),
    ("framer.students='some'", r"'framer.students': 'some' is not allowed"),
    ("framer.students=[0, 'a']", r"'framer.students'"),
    ("train.betas=[0.9]", r"'train.betas': expected two numbers"),
    ("framer=1", r"expected section.key=value"),
    ("checkpoint.export=['onnx']", r"'checkpoint.export': 'onnx' is not allowed"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[framer\nradius = 1"))
    with pytest.raises(ConfigError, match=r"unknown config key 'framer.radius_lf'"):
        load_config(_write(tmp_path, "[framer]\nradius_lf = 0.1\n"))
    with pytest.raises(ConfigError, match=r"unknown config key 'extra'"):
        load_config(_write(tmp_path, "[extra]\nx = 1\n"))
    with pytest.raises(ConfigError, match=r"'framer' is a section"):
        load_config(_write(tmp_path, "framer = 3\n"))


def test_cross_key_checks():
    with pytest.raises(ConfigError, match="parallel.ds_config"):
        load_config(None, ["parallel.backend='deepspeed'"])
    with pytest.raises(ConfigError, match="parallel.ac_blocks"):
        load_config(None, ["parallel.activation_checkpointing='blocks'"])
    with pytest.raises(ConfigError, match="data.path"):
        load_config(None, ["data.source='folder'"])


def test_round_trips(tmp_path):
    cfg = load_config(None, ["framer.radius=0.35", "framer.students=[1, 3]",
                             "dit4sr.lora.targets=['to_q']", "dit4sr.flow.shift=2.5"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    p = _write(tmp_path, dump_toml(cfg))
    assert load_config(p) == cfg
    with pytest.raises(ConfigError, match="unknown config key 'framer.nope'"):
        config_from_dict({"framer": {"nope": 1}})


def test_parse_override_literals():
    assert parse_override("a.b=1") == ("a.b", 1)
    assert parse_override("a.b=0.5") == ("a.b", 0.5)
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a.b=hello") == ("a.b", "hello")
    assert parse_override("a.b=x=y") == ("a.b", "x=y")


def test_every_framer_switch_is_documented():
    for f in dataclasses.fields(FramerConfig):
        assert f.metadata.get("doc"), f.name


@pytest.mark.skipif(not SHIPPED, reason="no configs/*.toml shipped yet")
@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_parse(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_pisasr_stage_configs():
    """FRAMER_U's two shipped stages: stage 2 starts from stage 1's checkpoints."""
    pix = load_config(ROOT / "configs/sd21_pisasr_framer_pixel.toml")
    sem = load_config(ROOT / "configs/sd21_pisasr_framer_semantic.toml")
    for cfg, mode in ((pix, "pix"), (sem, "sem")):
        assert (cfg.model.family, cfg.model.preset, cfg.train.mode) == ("pisasr", "sd2.1-base", mode)
        assert cfg.framer.enabled and cfg.data.prompt_len == 77
    assert pix.family_section.init_from == ""
    assert Path(sem.family_section.init_from) == Path(pix.train.out_dir) / "checkpoints"


def test_family_section_keys(tmp_path):
    """A family's keys live in its own section ([dit4sr], [dit4sr.lora], [dit4sr.flow]), validated
    like the rest; the old places are refused naming the new key; another family's section is
    refused while it is not the active family."""
    from framer_dist.models.dit4sr.config import DiT4SRConfig, section

    p = _write(tmp_path, "[dit4sr]\nlr_injection_scale = 0.5\n[dit4sr.lora]\nrank = 8\n"
                         "[dit4sr.flow]\nshift = 2.0\n")
    cfg = load_config(p, ["dit4sr.lora.alpha=4.0"])
    assert isinstance(cfg.family_section, DiT4SRConfig)
    sec = section(cfg)
    assert (sec.lr_injection_scale, sec.lora.rank, sec.lora.alpha, sec.flow.shift) == (0.5, 8, 4.0, 2.0)
    assert Config().family_section == DiT4SRConfig()  # a bare Config has the default family's
    with pytest.raises(ConfigError, match=r"unknown config key 'dit4sr.lora.rnak' \(did you mean 'rank'"):
        load_config(None, ["dit4sr.lora.rnak=2"])
    with pytest.raises(ConfigError, match="'dit4sr.flow.shift': 0.0 is below the minimum"):
        load_config(None, ["dit4sr.flow.shift=0.0"])
    for old, new in (("lora.rank=2", "dit4sr.lora.rank"), ("flow.shift=2.0", "dit4sr.flow.shift"),
                     ("model.lr_injection_scale=1.0", "dit4sr.lr_injection_scale")):
        with pytest.raises(ConfigError, match=f"config key '{old.split('=')[0]}' is now '{new}'"):
            load_config(None, [old])
    p = _write(tmp_path, "[lora]\nrank = 8\n")
    with pytest.raises(ConfigError, match="config key 'lora.rank' is now 'dit4sr.lora.rank'"):
        load_config(p)
    # the inactive family's section (the toy family has no section of its own)
    with pytest.raises(ConfigError, match="config section 'dit4sr' holds keys of the dit4sr family, "
                                          "but model.family is '_toy_family:FAMILY'"):
        load_config(None, ["model.family='_toy_family:FAMILY'", "model.preset='toy'",
                           "train.mode='all'", "dit4sr.lora.rank=2"])


def test_family_section_dump_and_legacy_dict(tmp_path):
    """dump_toml writes the nested family tables; a config dict written before the family seam
    (lora/flow/model.lr_injection_scale at top level, as checkpoints stored it) still loads."""
    from framer_dist.models.dit4sr.config import section

    cfg = load_config(None, ["dit4sr.lora.rank=3", "dit4sr.lr_injection_scale=0.9"])
    text = dump_toml(cfg)
    assert "[dit4sr]\nlr_injection_scale = 0.9\n" in text and "[dit4sr.lora]\nrank = 3\n" in text
    assert load_config(_write(tmp_path, text)) == cfg
    legacy = cfg.to_dict()
    dit = legacy.pop("dit4sr")
    legacy["lora"], legacy["flow"] = dit["lora"], dit["flow"]
    legacy["model"]["lr_injection_scale"] = dit["lr_injection_scale"]
    del legacy["model"]["family"]
    again = config_from_dict(legacy)
    assert again == cfg and section(again).lora.rank == 3
