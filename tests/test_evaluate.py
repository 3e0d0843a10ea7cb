"""PSNR/SSIM on Y vs scikit-image, known values, tables (with --baseline gains), the learned
metrics' worker and evaluation environment, and clear errors.

The tests marked "eval env" run the worker for real in the evaluation environment (`make
eval-env`, or FRAMER_EVAL_PYTHON) and are skipped, with one line, where it is not built."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from framer_dist import iqa_worker
from framer_dist.evaluate import (EVAL_PYTHON_ENV, METRICS, REPO_ROOT, WORKER, MetricError,
                                  check_against_pyiqa, eval_python, evaluate_folder, main,
                                  markdown_table, psnr_y, relative_gain, rgb_to_y, ssim_y,
                                  worker_request, write_tables)
from framer_dist.infer.io import InferenceError, read_image

PHOTOS = REPO_ROOT / "framer_dist" / "assets" / "photos"


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


def _two_methods(tmp_path, seed: int, offset_a: int, offset_b: int):
    """Two HR images (``hr/``) and two "methods" (``a/``, ``b/``): the HR shifted by an offset."""
    gt_dir, a_dir, b_dir = tmp_path / "hr", tmp_path / "a", tmp_path / "b"
    for i in range(2):
        gt = _rand(seed + i)
        _save(gt_dir, f"img{i}.png", gt)
        _save(a_dir, f"img{i}.png", np.clip(gt.astype(int) + offset_a, 0, 255).astype(np.uint8))
        _save(b_dir, f"img{i}.png", np.clip(gt.astype(int) + offset_b, 0, 255).astype(np.uint8))
    return gt_dir, a_dir, b_dir


def test_tables_and_no_reference_errors(tmp_path):
    gt_dir, a_dir, b_dir = _two_methods(tmp_path, 20, 3, 20)
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


def test_unreadable_image(tmp_path, capsys):
    d = tmp_path / "pred"
    d.mkdir()
    (d / "broken.png").write_bytes(b"not a png")
    _save(tmp_path / "hr", "broken.png", _rand(0))
    with pytest.raises(InferenceError, match="cannot read image .*broken.png"):
        evaluate_folder(d, tmp_path / "hr", ["psnr"])
    assert main(["--pred", str(d), "--gt", str(tmp_path / "hr"), "--out", str(tmp_path / "e")]) == 2
    assert "broken.png" in capsys.readouterr().err


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


# ----------------------------------------------------------------------------------------------
# --baseline: relative gains in each metric's direction


def test_relative_gain_follows_each_metrics_direction():
    assert relative_gain("psnr", 26.0, 25.0) == pytest.approx(4.0)       # higher is better
    assert relative_gain("ssim", 0.60, 0.75) == pytest.approx(-20.0)
    assert relative_gain("lpips", 0.27, 0.30) == pytest.approx(10.0)     # lower is better
    assert relative_gain("niqe", 6.0, 5.0) == pytest.approx(-20.0)
    for m in ("maniqa", "musiq", "clipiqa"):
        assert relative_gain(m, 0.55, 0.50) == pytest.approx(10.0)
    assert relative_gain("psnr", math.inf, 25.0) is None and relative_gain("psnr", 25.0, 0.0) is None
    assert relative_gain("lpips", None, 0.3) is None


def test_baseline_table_shows_gains(tmp_path):
    means = {"DiT4SR": {"psnr": 25.0, "ssim": 0.70, "lpips": 0.30, "niqe": 5.0, "musiq": 60.0},
             "FRAMER": {"psnr": 25.5, "ssim": 0.70, "lpips": 0.27, "niqe": 5.5, "musiq": 66.0}}
    metrics = ["psnr", "ssim", "lpips", "niqe", "musiq"]
    md = markdown_table({"RealSR": means}, metrics, baseline="DiT4SR")
    lines = md.splitlines()
    # best per column in bold (a tie: both), every non-baseline cell with its gain
    assert lines[2] == "| RealSR | DiT4SR | 25.00 | **0.7000** | 0.3000 | **5.00** | 60.00 |"
    assert lines[3] == ("|  | FRAMER | **25.50** (+2.00%) | **0.7000** (+0.00%) | **0.2700** (+10.00%) "
                        "| 5.50 (-10.00%) | **66.00** (+10.00%) |")
    assert "relative gain over DiT4SR" in md
    # without a baseline the table is as before; a dataset without that row shows no gains
    assert "%" not in markdown_table({"RealSR": means}, metrics)
    assert "%" not in markdown_table({"RealSR": means}, metrics, baseline="Other")
    paths = write_tables(tmp_path, "RealSR", means, {}, metrics, baseline="DiT4SR")
    rows = {r["method"]: r for r in csv.DictReader(paths["csv"].open())}
    assert rows["DiT4SR"]["lpips_gain_pct"] == ""
    assert float(rows["FRAMER"]["lpips_gain_pct"]) == pytest.approx(10.0)
    assert float(rows["FRAMER"]["niqe_gain_pct"]) == pytest.approx(-10.0)
    assert "(+10.00%)" in paths["table"].read_text()
    assert json.loads(paths["json"].read_text())["RealSR"] == means   # values only


def test_baseline_through_the_cli(tmp_path, capsys):
    gt_dir, a_dir, b_dir = _two_methods(tmp_path, 30, 20, 5)
    out = tmp_path / "eval"
    assert main(["--pred", f"Base={a_dir}", "--pred", f"New={b_dir}", "--gt", str(gt_dir),
                 "--dataset", "Toy", "--baseline", "Base", "--out", str(out)]) == 0
    rows = {r["method"]: r for r in csv.DictReader((out / "Toy.csv").open())}
    want = (float(rows["New"]["psnr"]) / float(rows["Base"]["psnr"]) - 1) * 100
    assert want > 0 and float(rows["New"]["psnr_gain_pct"]) == pytest.approx(want)
    assert f"({want:+.2f}%)" in (out / "Toy.md").read_text()
    # the baseline evaluated in an earlier run: its row joins this run's tables
    assert main(["--pred", f"Newer={gt_dir}", "--gt", str(gt_dir), "--dataset", "Toy",
                 "--baseline", "Base", "--out", str(out)]) == 0
    md = (out / "Toy.md").read_text()
    assert "| Toy | Base |" in md and "| Newer | **inf** |" in md
    # a baseline that is no row: one line, before any image is read
    capsys.readouterr()
    assert main(["--pred", f"A={a_dir}", "--gt", str(gt_dir), "--dataset", "Other", "--baseline", "Nope",
                 "--out", str(tmp_path / "e2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'Nope'" in err and "not a row" in err
    assert not (tmp_path / "e2").exists()


# ----------------------------------------------------------------------------------------------
# the learned metrics: evaluation environment, weight files, the worker's protocol


def test_missing_evaluation_environment_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(EVAL_PYTHON_ENV, raising=False)
    assert eval_python() == REPO_ROOT / ".venv-eval" / "bin" / "python"
    gt = _rand(0)
    _save(tmp_path / "hr", "x.png", gt)
    _save(tmp_path / "sr", "x.png", gt)
    nowhere = tmp_path / "no-env" / "bin" / "python"
    argv = ["--pred", str(tmp_path / "sr"), "--gt", str(tmp_path / "hr"), "--metrics", "psnr,lpips",
            "--iqa-weights", str(tmp_path), "--out", str(tmp_path / "e")]
    for extra, env in (([f"--eval-python={nowhere}"], None), ([], str(nowhere))):
        if env:
            monkeypatch.setenv(EVAL_PYTHON_ENV, env)
        assert main(argv + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert str(nowhere) in err and "make eval-env" in err and "lpips" in err
    assert not (tmp_path / "e").exists()
    # psnr/ssim alone never need it
    assert main(argv[:4] + ["--metrics", "psnr,ssim", "--out", str(tmp_path / "e")]) == 0


def test_missing_weight_file_names_the_file_and_where_pyiqa_looks(tmp_path, capsys):
    """Checked in this process, before the worker starts (here: this environment's own Python
    stands in as an existing --eval-python; it is never run)."""
    _save(tmp_path / "sr", "x.png", _rand(0))
    w = tmp_path / "weights"
    w.mkdir()
    base = ["--pred", str(tmp_path / "sr"), "--eval-python", sys.executable, "--out", str(tmp_path / "e")]
    assert main(base + ["--metrics", "musiq", "--iqa-weights", str(w)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "musiq_koniq_ckpt-e95806b9.pth" in err and str(w / "pyiqa" / "musiq_koniq_ckpt-e95806b9.pth") in err
    # LPIPS: pyiqa's file present, torchvision's AlexNet not
    (w / "pyiqa").mkdir()
    (w / "pyiqa" / "LPIPS_v0.1_alex-df73285e.pth").write_bytes(b"")
    with pytest.raises(MetricError, match=r"alexnet-owt-7be5be79.pth, not found at .*checkpoints"):
        evaluate_folder(tmp_path / "sr", tmp_path / "sr", ["lpips"], iqa_weights=w, python=sys.executable)
    # no --iqa-weights at all
    assert main(base + ["--metrics", "clipiqa"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--iqa-weights" in err and "clip/RN50.pt" in err
    assert not (tmp_path / "e").exists()


def test_worker_request_format(tmp_path):
    items = [(tmp_path / "sr" / "a.png", tmp_path / "hr" / "a.png"), (tmp_path / "sr" / "b.png", None)]
    req = worker_request(items, ["lpips", "musiq"], "weights", "cuda", {"musiq": {"x": 1}}, seed=3)
    assert json.loads(json.dumps(req)) == req
    assert req == {"protocol": iqa_worker.PROTOCOL, "metrics": ["lpips", "musiq"], "options": {"musiq": {"x": 1}},
                   "weights": str(Path("weights").resolve()), "device": "cuda", "seed": 3,
                   "items": [{"pred": str(items[0][0]), "gt": str(items[0][1])},
                             {"pred": str(items[1][0]), "gt": None}]}
    iqa_worker.check_request(req)
    for bad in ({**req, "protocol": 0}, {**req, "metrics": []}, {**req, "items": [{"gt": "x"}]}):
        with pytest.raises(iqa_worker.WorkerError):
            iqa_worker.check_request(bad)
    # every learned metric of the table runs in the worker, under its pyiqa name
    assert {m for m, i in METRICS.items() if i.pyiqa} == set(iqa_worker.WEIGHT_FILES)


def test_worker_outside_the_evaluation_environment_says_so(tmp_path, capsys):
    """The worker run for real, by this project's Python (which has no pyiqa): its answer is the
    protocol's error object and one line reaches the user."""
    _save(tmp_path / "sr", "x.png", _rand(0))
    w = tmp_path / "weights" / "pyiqa"
    w.mkdir(parents=True)
    (w / "niqe_modelparameters.mat").write_bytes(b"")   # present: the check passes, the worker starts
    assert main(["--pred", str(tmp_path / "sr"), "--metrics", "niqe", "--iqa-weights", str(w.parent),
                 "--eval-python", sys.executable, "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "pyiqa is not importable in" in err[-1] and "make eval-env" in err[-1], err
    assert not (tmp_path / "e").exists()
    # the worker's file protocol directly: an unreadable request is an error object, exit code 2
    (tmp_path / "req.json").write_text("{not json")
    r = subprocess.run([sys.executable, "-I", str(WORKER), str(tmp_path / "req.json"), str(tmp_path / "resp.json")])
    assert r.returncode == 2
    resp = json.loads((tmp_path / "resp.json").read_text())
    assert resp["ok"] is False and "cannot read the request" in resp["error"]


def test_worker_decodes_images_like_the_project(tmp_path):
    """The worker has its own copy of the decoding (it cannot import framer_dist.data): the
    learned metrics see the pixels PSNR/SSIM see, for every mode the project converts."""
    from PIL import Image

    rgb = _rand(7, 20, 28)
    rgba = np.concatenate([rgb, _rand(8, 20, 28)[..., :1]], axis=2)
    files = {
        "rgb.png": Image.fromarray(rgb),
        "gray16.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
        "rgba.png": Image.fromarray(rgba, "RGBA"),
        "la.png": Image.fromarray(rgba[..., [0, 3]], "LA"),
        "gray.png": Image.fromarray(rgb[..., 1]),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
    }
    pal = Image.fromarray(rgb).convert("P")
    pal.info["transparency"] = 0
    files["palette_t.png"] = pal
    for name, im in files.items():
        im.save(tmp_path / name, **({"transparency": 0} if name == "palette_t.png" else {}))
    rot = Image.fromarray(rgb)
    exif = rot.getexif()
    exif[0x0112] = 6   # rotate 90 degrees on display
    rot.save(tmp_path / "exif.jpg", exif=exif)
    for f in sorted(tmp_path.iterdir()):
        np.testing.assert_array_equal(iqa_worker.read_rgb(f), read_image(f), err_msg=f.name)
    assert iqa_worker.read_rgb(tmp_path / "exif.jpg").shape == (28, 20, 3)
    with pytest.raises(iqa_worker.WorkerError, match="cannot read image"):
        (tmp_path / "bad.png").write_bytes(b"no")
        iqa_worker.read_rgb(tmp_path / "bad.png")


# ---- eval env: the worker for real under pyiqa


def _eval_env() -> Path:
    py = eval_python()
    if not (py.is_file() and os.access(py, os.X_OK)):
        pytest.skip(f"no evaluation environment at {py} (make eval-env, or {EVAL_PYTHON_ENV})")
    return py


def _eval_run(py: Path, code: str) -> str:
    r = subprocess.run([str(py), "-I", "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_eval_env_pyiqa_psnr_ssim_agree_with_ours(tmp_path):
    """pyiqa's own psnry / ssim (BT.601 Y, crop 4) through the worker, against psnr_y / ssim_y, on
    the bundled photos with a bicubic x1/4 then x4 copy as the prediction (docs/evaluation.md has
    the figures). pyiqa rounds Y to integers before SSIM (MATLAB's uint8 convention), we do not
    (BasicSR's): SSIM differs by about 1e-3; PSNR agrees to 1e-4 dB."""
    py = _eval_env()
    rows, versions = check_against_pyiqa(PHOTOS, tmp_path, py)
    assert len(rows) == len(list(PHOTOS.glob("*.jpg"))) >= 5
    pins = dict(line.split("==") for line in (REPO_ROOT / "requirements-eval.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert versions["pyiqa"] == pins["pyiqa"]
    assert versions["torch"].split("+")[0] == pins["torch"]
    for r in rows:
        assert 20 < r["psnr"] < 40
        assert r["pyiqa_psnr"] == pytest.approx(r["psnr"], abs=1e-3), r
        assert r["pyiqa_ssim"] == pytest.approx(r["ssim"], abs=5e-3), r


def test_eval_env_weight_table_is_what_pyiqa_opens():
    """iqa_worker.WEIGHT_FILES (checked before anything runs) names the files pyiqa's code asks for."""
    py = _eval_env()
    out = _eval_run(py, """
import json, os, torchvision.models as tvm
from pyiqa.archs import lpips_arch, niqe_arch, maniqa_arch, musiq_arch, clip_model
b = lambda u: os.path.basename(u)
print(json.dumps({
 "lpips": ["pyiqa/" + b(lpips_arch.default_model_urls["0.1_alex"]),
           "checkpoints/" + b(tvm.AlexNet_Weights.IMAGENET1K_V1.url)],
 "niqe": ["pyiqa/" + b(niqe_arch.default_model_urls["url"])],
 "maniqa": ["pyiqa/" + b(maniqa_arch.default_model_urls["koniq"])],
 "musiq": ["pyiqa/" + b(musiq_arch.default_model_urls["koniq10k"])],
 "clipiqa": ["clip/" + b(clip_model._MODELS["RN50"])]}))
""")
    assert json.loads(out) == {m: list(f) for m, f in iqa_worker.WEIGHT_FILES.items()}


def test_eval_env_no_download_ever(tmp_path):
    """Weight files absent: one line naming the file and the path, from the worker's check or,
    for a metric outside its table, from pyiqa's own download attempt (blocked). MANIQA's timm
    backbone is not fetched: with a (broken) checkpoint in place the error is about that file."""
    py = _eval_env()
    _save(tmp_path / "sr", "x.png", _rand(0, 64, 64))
    w = tmp_path / "weights"
    w.mkdir()
    item = [(tmp_path / "sr" / "x.png", tmp_path / "sr" / "x.png")]
    from framer_dist.evaluate import run_worker

    with pytest.raises(MetricError) as e:
        run_worker(worker_request(item, ["musiq"], w), py)
    assert str(w / "pyiqa" / "musiq_koniq_ckpt-e95806b9.pth") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(MetricError) as e:   # DISTS: not in the table, its VGG16 backbone first
        run_worker(worker_request(item, ["dists"], w), py)
    assert str(w / "checkpoints" / "vgg16-397923af.pth") in str(e.value) and "nothing is downloaded" in str(e.value)
    (w / "pyiqa").mkdir()
    (w / "pyiqa" / "ckpt_koniq10k.pt").write_bytes(b"")
    with pytest.raises(MetricError) as e:
        run_worker(worker_request(item, ["maniqa"], w), py)
    msg = str(e.value)
    assert "could not build metric 'maniqa'" in msg and "ckpt_koniq10k.pt" in msg and "\n" not in msg
    assert "huggingface" not in msg.lower() and "hub" not in msg.split("ckpt_koniq10k.pt")[0].lower()


def test_eval_env_niqe_end_to_end_through_the_cli(tmp_path, capsys):
    """A learned metric through tools/evaluate.py for real: NIQE with a pristine model fitted
    here, by pyiqa's own NIQE feature code, on the bundled photos (no weights on this machine:
    pyiqa's file is the same fit over 125 other photos). The photos themselves then score better
    (lower) than their bicubic x4 copies, and --baseline shows the gain."""
    py = _eval_env()
    hr = tmp_path / "hr"
    hr.mkdir()
    for f in sorted(PHOTOS.glob("*.jpg")):
        _save(hr, f.stem + ".png", read_image(f))
    w = tmp_path / "weights" / "pyiqa"
    w.mkdir(parents=True)
    _eval_run(py, f"""
import glob, numpy as np, scipy.io, torch
from PIL import Image
from pyiqa.archs.niqe_arch import blockproc, compute_feature, normalize_img_with_gauss
from pyiqa.matlab_utils import imresize
from pyiqa.utils.color_util import to_y_channel
feats = []
for f in sorted(glob.glob({str(hr)!r} + "/*.png")):
    x = torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1)[None].double() / 255
    img = to_y_channel(x, 255, "yiq").round()
    h, w = img.shape[-2] // 96 * 96, img.shape[-1] // 96 * 96
    img = img[..., :h, :w]
    per = []
    for scale in (1, 2):
        norm = normalize_img_with_gauss(img, padding="replicate")
        per.append(blockproc(norm, [96 // scale, 96 // scale], fun=compute_feature))
        if scale == 1:
            img = imresize(img / 255.0, scale=0.5, antialiasing=True) * 255.0
    feats.append(torch.cat(per, -1)[0])
feats = torch.cat(feats).numpy()
scipy.io.savemat({str(w / "niqe_modelparameters.mat")!r},
                 {{"mu_prisparam": feats.mean(0)[None], "cov_prisparam": np.cov(feats.T)}})
""")
    rows, _ = check_against_pyiqa(PHOTOS, tmp_path / "work", py)   # writes work/sr: the bicubic copies
    out = tmp_path / "eval"
    assert main(["--pred", f"Bicubic={tmp_path / 'work' / 'sr'}", "--pred", f"HR={hr}", "--metrics", "niqe",
                 "--iqa-weights", str(w.parent), "--eval-python", str(py), "--baseline", "Bicubic",
                 "--dataset", "Photos", "--out", str(out)]) == 0
    assert "pyiqa 0.1.16" in capsys.readouterr().err
    means = json.loads((out / "results.json").read_text())["Photos"]
    assert 0 < means["HR"]["niqe"] < means["Bicubic"]["niqe"]
    per_image = list(csv.DictReader((out / "Photos_per_image.csv").open()))
    assert len(per_image) == 2 * len(rows) and all(float(r["niqe"]) > 0 for r in per_image)
    gain = (means["Bicubic"]["niqe"] - means["HR"]["niqe"]) / means["Bicubic"]["niqe"] * 100
    assert f"({gain:+.2f}%)" in (out / "Photos.md").read_text()
