"""PSNR/SSIM on Y vs scikit-image, known values, tables, and clear errors."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from framer_dist.evaluate import (MetricError, evaluate_folder, find_weight_file, load_iqa_metric,
                                  main, psnr_y, rgb_to_y, ssim_y, write_tables)
from framer_dist.infer.io import InferenceError


def _rand(seed, h=40, w=52):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _sk_y(img):
    return rgb2ycbcr(img)[..., 0]   # uint8 in -> Y in [16, 235], float64


@pytest.mark.parametrize("seed,crop", [(0, 0), (1, 4), (2, 3)])
def test_psnr_ssim_match_scikit_image_on_y(seed, crop):
    gt = _rand(seed)
    noisy = np.clip(gt.astype(int) + np.random.default_rng(seed + 10).integers(-30, 31, gt.shape), 0, 255)
    pred = noisy.astype(np.uint8)
    np.testing.assert_allclose(rgb_to_y(gt), _sk_y(gt), atol=1e-10)
    c = slice(crop, -crop) if crop else slice(None)
    yp, yg = _sk_y(pred)[c, c], _sk_y(gt)[c, c]
    want_psnr = peak_signal_noise_ratio(yg, yp, data_range=255)
    want_ssim = structural_similarity(yg, yp, data_range=255, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False)
    assert psnr_y(pred, gt, crop) == pytest.approx(want_psnr, abs=1e-4)
    assert ssim_y(pred, gt, crop) == pytest.approx(want_ssim, abs=1e-4)
    # float input in [0, 1] is the same image
    assert psnr_y(pred / 255.0, gt / 255.0, crop) == pytest.approx(want_psnr, abs=1e-4)


def test_known_values():
    gray = lambda v: np.full((32, 32, 3), v, np.uint8)  # noqa: E731
    assert math.isinf(psnr_y(gray(100), gray(100)))
    assert ssim_y(gray(100), gray(100)) == pytest.approx(1.0, abs=1e-12)
    # grey offset of 10 in RGB = 219 * 10 / 255 in Y
    d = 219.0 * 10 / 255
    assert psnr_y(gray(110), gray(100)) == pytest.approx(20 * math.log10(255 / d), abs=1e-9)
    # two flat images: SSIM = luminance term only
    y1, y2 = 16 + 219 * 100 / 255, 16 + 219 * 110 / 255
    c1 = (0.01 * 255) ** 2
    assert ssim_y(gray(110), gray(100)) == pytest.approx((2 * y1 * y2 + c1) / (y1 ** 2 + y2 ** 2 + c1), abs=1e-12)
    # differences only inside the cropped border do not count
    a = _rand(3, 30, 30)
    b = a.copy()
    b[:4] = 0
    b[:, -4:] = 255
    assert math.isinf(psnr_y(a, b, crop_border=4))
    assert psnr_y(a, b, crop_border=0) < 30
    with pytest.raises(ValueError, match="size"):
        psnr_y(a, a[:20])


def _save(folder, name, img):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(folder / name)


def test_tables_and_no_reference_errors(tmp_path):
    gt_dir, a_dir, b_dir = tmp_path / "hr", tmp_path / "a", tmp_path / "b"
    for i in range(2):
        gt = _rand(20 + i)
        _save(gt_dir, f"img{i}.png", gt)
        _save(a_dir, f"img{i}.png", np.clip(gt.astype(int) + 3, 0, 255).astype(np.uint8))
        _save(b_dir, f"img{i}.png", np.clip(gt.astype(int) + 20, 0, 255).astype(np.uint8))
    rc = main(["--pred", f"A={a_dir}", "--pred", f"B={b_dir}", "--gt", str(gt_dir),
               "--dataset", "Toy", "--out", str(tmp_path / "eval")])
    assert rc == 0
    rows = list(csv.DictReader((tmp_path / "eval" / "Toy.csv").open()))
    assert [r["method"] for r in rows] == ["A", "B"]
    assert float(rows[0]["psnr"]) > float(rows[1]["psnr"])
    md = (tmp_path / "eval" / "Toy.md").read_text()
    assert "PSNR↑" in md and "SSIM↑" in md and "| Toy | A |" in md and "**" in md
    per_image = list(csv.DictReader((tmp_path / "eval" / "Toy_per_image.csv").open()))
    assert len(per_image) == 4
    # a second dataset merges into the combined table
    assert main(["--pred", f"A={a_dir}", "--gt", str(gt_dir), "--dataset", "Toy2",
                 "--out", str(tmp_path / "eval")]) == 0
    merged = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(merged) == {"Toy", "Toy2"}
    assert "| Toy2 | A |" in (tmp_path / "eval" / "table.md").read_text()
    # no-reference mode refuses full-reference metrics clearly
    with pytest.raises(InferenceError, match="need ground truth"):
        evaluate_folder(a_dir, None, ["psnr"])
    # missing ground truth for a prediction
    _save(tmp_path / "c", "other.png", _rand(1))
    with pytest.raises(InferenceError, match="no ground truth"):
        evaluate_folder(tmp_path / "c", gt_dir, ["psnr"])


def test_unreadable_image_and_missing_metric_weights(tmp_path, capsys):
    d = tmp_path / "pred"
    d.mkdir()
    (d / "broken.png").write_bytes(b"not a png")
    _save(tmp_path / "hr", "broken.png", _rand(0))
    with pytest.raises(InferenceError, match="cannot read image .*broken.png"):
        evaluate_folder(d, tmp_path / "hr", ["psnr"])
    assert main(["--pred", str(d), "--gt", str(tmp_path / "hr"), "--out", str(tmp_path / "e")]) == 2
    assert "broken.png" in capsys.readouterr().err
    # weights folder without MUSIQ's file: the error names the file and the folder
    w = tmp_path / "weights"
    w.mkdir()
    with pytest.raises(MetricError, match="musiq_koniq_ckpt-e95806b9.pth.*weights"):
        load_iqa_metric("musiq", w)
    with pytest.raises(MetricError, match="--iqa-weights"):
        find_weight_file("niqe", None)
    # the file present but pyiqa absent (this environment has no torchvision): named clearly
    (w / "niqe_modelparameters.mat").write_bytes(b"x")
    try:
        import pyiqa  # noqa: F401
        has_pyiqa = True
    except Exception:
        has_pyiqa = False
    if not has_pyiqa:
        with pytest.raises(MetricError, match="pyiqa"):
            load_iqa_metric("niqe", w)


def test_16bit_ground_truth_is_scaled_not_clipped(tmp_path):
    """A 16-bit PNG (common for HR test sets) is read as 8-bit RGB scaled by 255/65535, as the
    training data path does; PIL's plain convert("RGB") clips it to white."""
    from framer_dist.infer.io import read_image

    rgb = _rand(5, 24, 32)
    gray8 = rgb[..., 0]
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "gt" / "a.png")  # I;16
    Image.fromarray(np.repeat(gray8[..., None], 3, axis=2)).save(tmp_path / "pred" / "a.png")
    got = read_image(tmp_path / "gt" / "a.png")
    assert got.dtype == np.uint8 and got.shape == (24, 32, 3)
    np.testing.assert_array_equal(got[..., 1], gray8)
    rows, mean = evaluate_folder(tmp_path / "pred", tmp_path / "gt", ["psnr"], crop_border=0)
    assert math.isinf(mean["psnr"])


def test_two_predictions_with_the_same_name_are_refused(tmp_path, capsys):
    """`--pred a/out --pred b/out` both default to the row name "out": the second used to
    replace the first silently in every table."""
    for d in ("a/out", "b/out", "hr"):
        _save(tmp_path / d, "x.png", _rand(0))
    argv = ["--pred", str(tmp_path / "a" / "out"), "--pred", str(tmp_path / "b" / "out"),
            "--gt", str(tmp_path / "hr"), "--out", str(tmp_path / "e")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "'out'" in err and "METHOD=DIR" in err
    assert not (tmp_path / "e").exists()
    assert main(argv[:1] + [f"A={tmp_path / 'a' / 'out'}", "--pred", f"B={tmp_path / 'b' / 'out'}"]
                + argv[4:]) == 0


def test_results_json_survives_a_crash_mid_write(tmp_path):
    """results.json merges every dataset evaluated into the folder; a crash (here: the disk
    filling up) while writing the next dataset's merge must leave the earlier results whole."""
    from _disk_full import run_with_file_size_limit

    out = tmp_path / "eval"
    many = {f"method{i:03d}": {"psnr": 20.0 + i / 7, "ssim": 0.5 + i / 1000} for i in range(60)}
    write_tables(out, "Big", many, {}, ["psnr", "ssim"])
    before = (out / "results.json").read_text()
    assert len(before) > 4096
    code = ("from framer_dist.evaluate import write_tables\n"
            f"write_tables({str(out)!r}, 'Small', {{'A': {{'psnr': 30.0, 'ssim': 0.9}}}}, {{}}, "
            "['psnr', 'ssim'])\n")
    proc = run_with_file_size_limit(code, limit=4096)
    assert proc.returncode != 0 and "File too large" in proc.stderr, proc.stderr
    assert (out / "Small.md").is_file()  # the small files went through; the merge did not
    assert (out / "results.json").read_text() == before
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]
    # without the limit the merge goes through
    write_tables(out, "Small", {"A": {"psnr": 30.0, "ssim": 0.9}}, {}, ["psnr", "ssim"])
    assert set(json.loads((out / "results.json").read_text())) == {"Big", "Small"}


def test_damaged_results_json_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "results.json").write_text('{"Toy": {"A": {"psnr": 3')
    gt = _rand(3)
    _save(tmp_path / "hr", "x.png", gt)
    _save(tmp_path / "a", "x.png", gt)
    assert main(["--pred", f"A={tmp_path / 'a'}", "--gt", str(tmp_path / "hr"), "--dataset", "T",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out / "results.json") in err and "Traceback" not in err
    assert (out / "results.json").read_text() == '{"Toy": {"A": {"psnr": 3'
    assert not (out / "T.md").exists()  # nothing written before the check
