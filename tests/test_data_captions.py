"""One captions-JSONL reader (framer_dist.data.captions) and its three callers: the captioner's
resume, the prompt encoder and framer-sr."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from framer_dist.data.captioning import caption_images, read_done
from framer_dist.data.captions import CaptionsError, read_captions
from framer_dist.data.images import DataReport
from framer_dist.data.text_encode import encode_captions
from framer_dist.infer.io import InferenceError
from framer_dist.infer.prompts import HashedPromptEncoder
from framer_dist.infer.prompts import read_captions as infer_read_captions

# Unicode line separators that str.splitlines() splits at but JSON keeps inside a string
# (json.dumps(..., ensure_ascii=False), as tools/caption.py writes, leaves them raw)
SEPARATORS = "a\u2028b\u2029c\x85d\x0ce\x1cf"


def _write(path: Path, lines: list[str], end: str = "\n") -> Path:
    path.write_text("".join(line + end for line in lines), encoding="utf-8")
    return path


def _rec(i: str, c: object) -> str:
    return json.dumps({"id": i, "caption": c}, ensure_ascii=False)


def test_reader_accepts_blank_lines_crlf_bom_and_separators_inside_captions(tmp_path):
    f = _write(tmp_path / "c.jsonl", [_rec("a", "one"), "", "   ", _rec("b", SEPARATORS), _rec("c", "")],
               end="\r\n")
    f.write_bytes(b"\xef\xbb\xbf" + f.read_bytes() + _rec("d", "no newline at the end").encode())
    caps = read_captions(f)
    assert caps == {"a": "one", "b": SEPARATORS, "c": "", "d": "no newline at the end"}
    assert list(caps) == ["a", "b", "c", "d"]                  # file order


@pytest.mark.parametrize("line,message", [
    ("{not json", "c.jsonl:2: not valid JSON"),
    ('["a", "b"]', "c.jsonl:2: expected a JSON object, got list"),
    ("7", "c.jsonl:2: expected a JSON object, got int"),
    ('{"id": "x"}', "c.jsonl:2: expected an id (id) and a caption (caption), got keys ['id']"),
    ('{"image": "x", "caption": "y"}', "c.jsonl:2: expected an id"),
    ('{"id": "x", "caption": null}', "c.jsonl:2: 'caption' must be a string, got NoneType None"),
    ('{"id": "x", "caption": ["a", "b"]}', "c.jsonl:2: 'caption' must be a string, got list"),
    ('{"id": 3, "caption": "y"}', "c.jsonl:2: 'id' must be a non-empty string, got int 3"),
    ('{"id": "", "caption": "y"}', "c.jsonl:2: 'id' must be a non-empty string"),
    (_rec("a", "again"), "c.jsonl:2: id 'a' already has a caption on line 1"),
])
def test_reader_names_file_and_line_of_every_unusable_line(tmp_path, line, message):
    f = _write(tmp_path / "c.jsonl", [_rec("a", "one"), line, _rec("z", "after")])
    with pytest.raises(CaptionsError) as e:
        read_captions(f)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_reader_errors_on_missing_file_and_non_utf8(tmp_path):
    with pytest.raises(CaptionsError, match="captions file not found: .*nope.jsonl"):
        read_captions(tmp_path / "nope.jsonl")
    f = tmp_path / "c.jsonl"
    f.write_bytes(_rec("a", "one").encode() + b"\n" + b'{"id": "b", "caption": "caf\xe9"}\n')
    with pytest.raises(CaptionsError, match=r"c.jsonl:2: not UTF-8"):
        read_captions(f)


def test_reader_key_aliases_take_the_first_present_key(tmp_path):
    f = _write(tmp_path / "c.jsonl", ['{"file": "a.png", "text": "t", "name": "other"}',
                                      '{"id": "b", "image": "b.png", "prompt": "p", "caption": "c"}'])
    got = read_captions(f, id_keys=("id", "image", "file", "name"), caption_keys=("caption", "prompt", "text"))
    assert got == {"a.png": "t", "b": "c"}
    with pytest.raises(CaptionsError, match="c.jsonl:1: expected an id"):
        read_captions(f)                                       # default keys: id and caption only


# --- the prompt encoder (tools/encode_prompts.py): a bad line was a warning and the record lost


def _encode(caps: Path, out: Path) -> int:
    return encode_captions(caps, out, HashedPromptEncoder(8, 6, tokens=4), dtype="fp32")


@pytest.mark.parametrize("line", ["{not json", '{"id": "x"}', '{"id": "x", "caption": 5}',
                                  _rec("a", "other")])
def test_encoder_refuses_a_bad_line_before_writing_anything(tmp_path, line):
    caps = _write(tmp_path / "caps.jsonl", [_rec("a", "one"), line])
    with pytest.raises(CaptionsError, match="caps.jsonl:2"):
        _encode(caps, tmp_path / "emb")
    assert not (tmp_path / "emb").exists()


def test_encoder_keeps_a_caption_with_unicode_line_separators(tmp_path):
    from framer_dist.data.prompts import PromptStore

    caps = _write(tmp_path / "caps.jsonl", [_rec("a", SEPARATORS), _rec("b", "two")])
    assert _encode(caps, tmp_path / "emb") == 2
    e, _ = HashedPromptEncoder(8, 6, tokens=4)([SEPARATORS])
    assert (PromptStore(tmp_path / "emb").get("a")[0] == e[0]).all()


# --- the captioner's resume (tools/caption.py): bad lines were skipped silently


def _folder(root: Path, names: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        arr = np.random.default_rng(k).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / name)
    return root


def _fixed(text: str):
    return lambda images: [text] * len(images)


def test_captioner_redoes_a_complete_last_line_without_newline(tmp_path):
    imgs = _folder(tmp_path / "imgs", ["im0.png", "im1.png"])
    out = tmp_path / "caps.jsonl"
    assert caption_images(str(imgs), out, _fixed("first"), limit=1) == 1
    with open(out, "a", encoding="utf-8") as fh:       # interrupted right before the newline
        fh.write(_rec("im1", "cut off"))
    assert caption_images(str(imgs), out, _fixed("second")) == 1
    assert read_done(out) == {"im0": "first", "im1": "second"}


def test_captioner_resume_refuses_a_damaged_line(tmp_path):
    imgs = _folder(tmp_path / "imgs", ["im0.png", "im1.png"])
    out = _write(tmp_path / "caps.jsonl", [_rec("im0", "x"), "{garbage", _rec("im9", "y")])
    with pytest.raises(CaptionsError, match="caps.jsonl:2: not valid JSON"):
        caption_images(str(imgs), out, _fixed("new"))


def test_captioner_treats_a_caption_with_line_separators_as_done(tmp_path):
    imgs = _folder(tmp_path / "imgs", ["im0.png"])
    out = tmp_path / "caps.jsonl"
    assert caption_images(str(imgs), out, _fixed(SEPARATORS), filter_words=None) == 1
    assert caption_images(str(imgs), out, _fixed("again"), filter_words=None) == 0
    assert read_done(out) == {"im0": SEPARATORS}


def test_captioner_writes_an_id_once_and_reports_the_other_image(tmp_path):
    imgs = _folder(tmp_path / "imgs", ["a.jpg", "a.png", "b.png"])     # a.jpg and a.png: id "a"
    out = tmp_path / "caps.jsonl"
    report = DataReport()
    assert caption_images(str(imgs), out, _fixed("x"), batch_size=8, report=report) == 2
    assert report.counts["skipped_duplicate_id"] == 1
    assert "a.png" in report.examples["skipped_duplicate_id"][0]
    assert read_done(out) == {"a": "x", "b": "x"}              # readable: each id once


# --- framer-sr --captions: same rules, its own key names, errors as InferenceError


def test_infer_captions_keep_line_separators_inside_a_caption(tmp_path):
    f = _write(tmp_path / "caps.jsonl", ['{"image": "a.png", "text": "x"}', "", _rec("b", SEPARATORS)])
    caps = infer_read_captions(f)
    assert caps["a.png"] == caps["a"] == "x" and caps["b"] == SEPARATORS


@pytest.mark.parametrize("line,message", [
    (_rec("a.png", "again"), "caps.jsonl:3: id 'a.png' already has a caption on line 1"),
    ('{"id": "c", "caption": 12}', "caps.jsonl:3: 'caption' must be a string"),
    ('{"file": 12, "caption": "y"}', "caps.jsonl:3: 'file' must be a non-empty string"),
    ("42", "caps.jsonl:3: expected a JSON object"),
])
def test_infer_captions_refuse_what_the_shared_rules_refuse(tmp_path, line, message):
    f = _write(tmp_path / "caps.jsonl", ['{"image": "a.png", "text": "x"}', "", line])
    with pytest.raises(InferenceError, match=message):
        infer_read_captions(f)
