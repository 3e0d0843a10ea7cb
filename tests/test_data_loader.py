"""Sources, the global resumable stream, messy folders, prompt lookup, VAE encoding."""

from __future__ import annotations

import itertools
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from framer_dist.config import ConfigError, load_config
from framer_dist.data import DataSourceError, build_dataloader, encode_batch, load_vae
from framer_dist.data.prompts import write_empty, write_shard
from framer_dist.data.stream import item_at


def _cfg(*over: str):
    return load_config(None, ["data.resolution=32", "data.min_size=20", "data.batch_size=2",
                              "data.null_prompt_prob=0.0", *over])


def _rgb(seed: int, h: int = 48, w: int = 56) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC))


def _good_folder(root: Path, n: int) -> Path:
    for i in range(n):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_rgb(i)).save(sub / f"img{i}.png")
    return root


def _ids(pipe, n_batches: int) -> list[str]:
    return [i for b in itertools.islice(pipe, n_batches) for i in b["ids"]]


def test_messy_folder_loads_reports_and_encodes(tmp_path):
    root = tmp_path / "messy"
    root.mkdir()
    Image.fromarray(_rgb(1)).save(root / "good1.jpg", quality=90)
    Image.fromarray(_rgb(2)).save(root / "good2.webp")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    buf = (root / "good1.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(buf[: len(buf) // 2])
    Image.fromarray(np.ascontiguousarray(_rgb(3)[..., 0])).save(root / "gray.png")
    Image.fromarray(_rgb(4, 16, 16)).save(root / "tiny16.png")
    Image.fromarray(_rgb(5)).convert("CMYK").save(root / "cmyk.jpg")
    rgba = np.dstack([_rgb(6), np.full((48, 56), 128, np.uint8)])
    Image.fromarray(rgba).save(root / "alpha.png")
    Image.fromarray(np.ascontiguousarray(_rgb(7)[..., 1]).astype(np.uint16) * 257).save(root / "deep16.png")
    Image.fromarray(_rgb(8, 24, 40)).save(root / "small.png")   # above min_size, below the crop
    (root / "notes.txt").write_text("not an image")

    cfg = _cfg("data.source='folder'", f"data.path='{root}'", "data.batch_size=4")
    pipe = build_dataloader(cfg, 0, 1, 0)
    batches = list(itertools.islice(pipe, 6))   # 24 positions > 2 epochs of the 10 images
    for b in batches:
        assert b["hr_raw"].shape == (4, 3, 32, 32) and b["hr_raw"].dtype == torch.uint8
        assert "corrupt" not in b["ids"] and "truncated" not in b["ids"] and "tiny16" not in b["ids"]
    seen = {i for b in batches for i in b["ids"]}
    assert {"good1", "good2", "gray", "cmyk", "alpha", "deep16", "small"} <= seen
    c = pipe.report.as_dict()
    assert c["skipped_corrupt"] >= 2 and c["skipped_tiny"] >= 1
    for kind in ("converted_gray", "converted_cmyk", "converted_alpha", "converted_16bit", "upscaled"):
        assert c.get(kind, 0) >= 1, (kind, c)
    assert "skipped_corrupt" in pipe.report.summary()
    # the 16-bit image keeps its full range when converted (not clipped to white)
    i16 = next(b["hr_raw"][b["ids"].index("deep16")] for b in batches if "deep16" in b["ids"])
    assert 0 < i16.float().mean() < 250
    # a batch goes through the online degradation + tiny VAE encoding the trainer uses
    out = encode_batch(load_vae(cfg.data, cfg.model.family), batches[0])
    assert out["hr_latent"].shape == (4, 16, 4, 4) and out["lr_latent"].shape == (4, 16, 4, 4)
    assert out["hr"].shape == out["lr"].shape == (4, 3, 32, 32)
    assert out["lr"].min() >= -1 and out["lr"].max() <= 1
    assert torch.isfinite(out["hr_latent"]).all()


def test_global_stream_sharding_resume_and_world_size_change(tmp_path):
    root = _good_folder(tmp_path / "imgs", 7)
    base = ["data.source='folder'", f"data.path='{root}'", "data.batch_size=2"]
    one = build_dataloader(_cfg(*base), 0, 1, 0)
    ref = list(itertools.islice(one, 8))                # 16 positions: two epochs and a bit
    ref_ids = [i for b in ref for i in b["ids"]]
    assert [int(i) for b in ref for i in b["index"]] == list(range(16))
    # each epoch is a permutation of all items
    assert sorted(ref_ids[:7]) == sorted(ref_ids[7:14]) and len(set(ref_ids[:7])) == 7
    assert ref_ids[:7] != ref_ids[7:14]                 # and a different one per epoch

    # two ranks: disjoint, interleaved per micro-batch, together the same global stream
    r0 = list(itertools.islice(build_dataloader(_cfg(*base), 0, 2, 0), 3))
    r1 = list(itertools.islice(build_dataloader(_cfg(*base), 1, 2, 0), 3))
    merged = [i for a, b in zip(r0, r1) for i in a["ids"] + b["ids"]]
    assert merged == ref_ids[:12]
    # crops (from the per-sample seed) are identical too
    assert torch.equal(r1[0]["hr_raw"], ref[1]["hr_raw"])

    # resume at global position 8 with world size 1 -> the same samples as the uninterrupted run
    res = list(itertools.islice(build_dataloader(_cfg(*base), 0, 1, 8), 4))
    assert [i for b in res for i in b["ids"]] == ref_ids[8:16]
    assert torch.equal(res[0]["hr_raw"], ref[4]["hr_raw"])
    assert torch.equal(res[0]["seed"], ref[4]["seed"])

    # worker processes do not change the order
    w2 = build_dataloader(_cfg(*base, "data.num_workers=2"), 0, 1, 0)
    assert _ids(w2, 6) == ref_ids[:12]


def test_tar_shards_and_synthetic(tmp_path):
    shards = []
    for s in range(2):
        p = tmp_path / f"shard-{s:03d}.tar"
        with tarfile.open(p, "w") as tf:
            for k in range(3):
                img = tmp_path / "tmp.jpg"
                Image.fromarray(_rgb(10 * s + k)).save(img, quality=92)
                tf.add(img, arcname=f"s{s}/sample{k}.jpg")
                cap = tmp_path / "cap.txt"
                cap.write_text("a caption")
                tf.add(cap, arcname=f"s{s}/sample{k}.txt")
        shards.append(p)
    cfg = _cfg("data.source='webdataset'", f"data.path='{tmp_path}/shard-{{000..001}}.tar'")
    pipe = build_dataloader(cfg, 0, 1, 0)
    ids = _ids(pipe, 3)
    assert sorted(ids) == sorted(f"s{s}/sample{k}" for s in range(2) for k in range(3))
    assert not pipe.report.as_dict()
    with pytest.raises(DataSourceError, match="data.path"):
        build_dataloader(_cfg("data.source='webdataset'", f"data.path='{tmp_path}/nope-{{0..1}}.tar'"), 0, 1, 0)

    syn = _cfg("data.source='synthetic'", "data.resolution=64")
    a = next(iter(build_dataloader(syn, 0, 1, 4)))
    b = list(itertools.islice(build_dataloader(syn, 0, 1, 0), 3))[2]
    assert a["hr_latent"].shape == (2, 16, 8, 8)
    assert torch.equal(a["hr_latent"], b["hr_latent"]) and torch.equal(a["prompt_embeds"], b["prompt_embeds"])
    assert a["prompt_embeds"].shape == (2, 154, 32) and a["pooled"].shape == (2, 32)  # tiny preset


def test_cached_prompt_lookup_null_prompt_and_missing(tmp_path):
    root = _good_folder(tmp_path / "imgs", 6)
    emb = tmp_path / "emb"
    emb.mkdir()
    ids = ["a/img1", "b/img0", "b/img2", "a/img3"]            # img4 and img5 have no embedding
    pe = torch.arange(4, dtype=torch.float32)[:, None, None].expand(4, 10, 32).to(torch.bfloat16)
    write_shard(emb / "prompts-00000.safetensors", ids, pe, torch.arange(4.0)[:, None].expand(4, 32))
    write_empty(emb, torch.full((10, 32), -1.0), torch.full((32,), -1.0))
    base = ["data.source='folder'", f"data.path='{root}'", f"data.prompt_embeddings='{emb}'"]
    pipe = build_dataloader(_cfg(*base), 0, 1, 0)
    batches = list(itertools.islice(pipe, 3))
    for b in batches:
        assert b["prompt_embeds"].dtype == torch.float32 and b["prompt_embeds"].shape == (2, 10, 32)
        for j, i in enumerate(b["ids"]):
            want = float(ids.index(i)) if i in ids else -1.0
            assert b["prompt_embeds"][j, 0, 0] == want and b["pooled"][j, 0] == want
    assert pipe.report.as_dict()["missing_prompt"] == 2
    # null prompt: per-sample seeded, about the configured share, identical on a re-run
    runs = []
    for _ in range(2):
        p = build_dataloader(_cfg(*base, "data.null_prompt_prob=0.5"), 0, 1, 0)
        runs.append(torch.cat([b["pooled"][:, 0] for b in itertools.islice(p, 30)]))
    assert torch.equal(runs[0], runs[1])
    share = (runs[0] == -1).float().mean().item()
    assert 0.55 < share < 0.85, share       # 0.5 null + (1/3 missing of the rest)
    with pytest.raises(DataSourceError, match="data.prompt_embeddings"):
        build_dataloader(_cfg(*base[:2], f"data.prompt_embeddings='{tmp_path}'"), 0, 1, 0)
    # cached embeddings of the wrong width for the model preset are refused up front
    bad = tmp_path / "bad"
    bad.mkdir()
    write_empty(bad, torch.zeros(10, 48), torch.zeros(32))
    with pytest.raises(DataSourceError, match="D=32"):
        build_dataloader(_cfg(*base[:2], f"data.prompt_embeddings='{bad}'"), 0, 1, 0)


def test_bad_config_errors_name_the_key(tmp_path):
    with pytest.raises(DataSourceError, match="data.path.*not found"):
        build_dataloader(_cfg("data.source='folder'", f"data.path='{tmp_path}/missing'"), 0, 1, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="no images"):
        build_dataloader(_cfg("data.source='folder'", f"data.path='{tmp_path}/empty'"), 0, 1, 0)
    with pytest.raises(DataSourceError, match="no cached-pair shards"):
        build_dataloader(_cfg("data.source='cached'", f"data.path='{tmp_path}/empty'"), 0, 1, 0)
    with pytest.raises(ConfigError, match="data.resolution"):  # refused by the config itself
        _cfg("data.source='folder'", f"data.path='{tmp_path}/empty'", "data.resolution=40")
    with pytest.raises(DataSourceError, match="data.degrade_online"):
        build_dataloader(_cfg("data.source='folder'", f"data.path='{tmp_path}/empty'",
                              "data.degrade_online=false"), 0, 1, 0)
    # a folder where every image is unusable: a clear error, not an endless loop
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"x{i}.png").write_bytes(b"garbage")
    with pytest.raises(DataSourceError, match="unusable images"):
        next(iter(build_dataloader(_cfg("data.source='folder'", f"data.path='{bad}'"), 0, 1, 0)))
    assert item_at(5, 3, 0) in range(3)


def _hand_cache(root: Path, latent: int, manifest: dict | None) -> Path:
    """A cached-pair folder as tools/prepare_data.py leaves it (one shard + manifest.json)."""
    import json

    from framer_dist.atomic import save_safetensors_atomic

    g = torch.Generator().manual_seed(0)
    save_safetensors_atomic({"hr_latent": torch.randn(2, 16, latent, latent, generator=g),
                             "lr_latent": torch.randn(2, 16, latent, latent, generator=g)},
                            root / "pairs-00000.safetensors",
                            metadata={"ids": json.dumps(["a#0", "b#0"])})
    if manifest is not None:
        (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_cached_source_refuses_resolution_or_scale_other_than_the_manifest(tmp_path):
    """The cache's latents are fixed: a run whose data.resolution / data.scale differ from what
    the cache was prepared with is refused (naming both values and the manifest), not trained
    silently at the cache's size."""
    cache = _hand_cache(tmp_path / "cache", 4, {"resolution": 32, "scale": 4, "passes": 1})
    man = str(cache / "manifest.json")
    ok = build_dataloader(_cfg("data.source='cached'", f"data.path='{cache}'", "data.scale=4"), 0, 1)
    assert next(iter(ok))["hr_latent"].shape == (2, 16, 4, 4)
    with pytest.raises(DataSourceError) as e:
        build_dataloader(_cfg("data.source='cached'", f"data.path='{cache}'", "data.scale=2"), 0, 1)
    msg = str(e.value)
    assert "data.scale=2" in msg and "scale=4" in msg and man in msg and "resolution" not in msg
    with pytest.raises(DataSourceError) as e:
        build_dataloader(_cfg("data.source='cached'", f"data.path='{cache}'",
                              "data.resolution=64", "data.scale=2"), 0, 1)
    msg = str(e.value)
    assert "data.resolution=64" in msg and "resolution=32" in msg and "data.scale=2" in msg
    assert man in msg
    # no manifest (a hand-made cache): the latent size still has to fit data.resolution
    bare = _hand_cache(tmp_path / "bare", 4, None)
    with pytest.raises(DataSourceError, match=r"data.resolution.*64.*8x8.*4x4"):
        build_dataloader(_cfg("data.source='cached'", f"data.path='{bare}'",
                              "data.resolution=64"), 0, 1)


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    import io

    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path


def _png_bytes(seed: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(_rgb(seed)).save(buf, "PNG")
    return buf.getvalue()


def test_tar_source_reads_more_shards_than_the_open_file_limit(tmp_path):
    """A permutation touches every shard; the source must not keep one open file per shard (with
    thousands of shards and ``ulimit -n`` 1024, reads failed with EMFILE and good samples were
    skipped as unreadable)."""
    import os
    import resource

    png = _png_bytes(0)
    n = 3 * 32 + 10
    for s in range(n):
        _tar(tmp_path / f"s-{s:04d}.tar", [(f"k{s}.png", png)])
    cfg = _cfg("data.source='webdataset'", f"data.path='{tmp_path}/s-*.tar'", "data.batch_size=8")
    pipe = build_dataloader(cfg, 0, 1, 0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, in_use + 48), hard))
    try:
        ids = _ids(pipe, -(-n // 8))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert not pipe.report.as_dict()
    assert sorted(ids[:n]) == sorted(f"k{s}" for s in range(n))


def test_tar_sample_without_an_image_member_is_reported(tmp_path):
    """A WebDataset sample whose members hold no image (only a caption, or an image under an
    extension the source does not read) is counted, not dropped silently at indexing."""
    shard = _tar(tmp_path / "a.tar", [("k0.png", _png_bytes(0)), ("k0.txt", b"cap"),
                                      ("k1.txt", b"no image"), ("k2.hr.png", _png_bytes(2)),
                                      ("k3.png", _png_bytes(3))])
    pipe = build_dataloader(_cfg("data.source='webdataset'", f"data.path='{shard}'"), 0, 1, 0)
    assert sorted(set(_ids(pipe, 2))) == ["k0", "k3"]
    assert pipe.report.as_dict() == {"skipped_no_image": 2}
    ex = pipe.report.examples["skipped_no_image"]
    assert any("k1" in e and ".txt" in e for e in ex) and any("k2" in e and ".hr.png" in e for e in ex)


def test_truncated_cached_shard_is_a_data_source_error_naming_the_file(tmp_path):
    """A partly copied cache (a truncated shard) is refused up front naming the shard, not a bare
    SafetensorError traceback that does not say which file."""
    cache = _hand_cache(tmp_path / "cache", 4, None)
    good = sorted(cache.glob("*.safetensors"))[0]
    bad = cache / "pairs-99999.safetensors"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataSourceError, match=r"data.path.*pairs-99999.safetensors.*prepare_data"):
        build_dataloader(_cfg("data.source='cached'", f"data.path='{cache}'"), 0, 1)


def test_prompt_shards_that_cannot_stack_with_the_empty_prompt_are_refused_up_front(tmp_path):
    """A prompt folder holding rows of another length (e.g. a resume of encode_prompts with
    another --t5-len) used to crash torch.stack mid-epoch, at the first batch mixing the two; and
    a truncated shard raised a bare SafetensorError. Both are a DataSourceError at start-up."""
    root = _good_folder(tmp_path / "imgs", 4)
    emb = tmp_path / "emb"
    emb.mkdir()
    write_empty(emb, torch.zeros(10, 32), torch.zeros(32))
    write_shard(emb / "prompts-00000.safetensors", ["a/img1", "b/img0"], torch.ones(2, 10, 32),
                torch.ones(2, 32))
    base = ["data.source='folder'", f"data.path='{root}'", f"data.prompt_embeddings='{emb}'"]
    assert next(iter(build_dataloader(_cfg(*base), 0, 1, 0)))["prompt_embeds"].shape == (2, 10, 32)
    write_shard(emb / "prompts-00001.safetensors", ["b/img2"], torch.ones(1, 12, 32), torch.ones(1, 32))
    with pytest.raises(DataSourceError, match=r"data.prompt_embeddings.*prompts-00001.*\[12, 32\]"):
        build_dataloader(_cfg(*base), 0, 1, 0)
    good = (emb / "prompts-00000.safetensors").read_bytes()
    (emb / "prompts-00001.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataSourceError, match=r"data.prompt_embeddings.*prompts-00001.*not a readable"):
        build_dataloader(_cfg(*base), 0, 1, 0)


def test_a_file_that_vanishes_after_listing_is_counted_not_fatal(tmp_path):
    """A file listed at start-up that cannot be read later (deleted on a shared filesystem, an I/O
    error) is skipped as ``skipped_unreadable`` by the reader both the loader and prepare_data use."""
    from framer_dist.data.images import ImageSkipped, read_crop
    from framer_dist.data.sources import FolderSource

    src = FolderSource(_good_folder(tmp_path / "imgs", 3))
    rng = np.random.default_rng(0)
    crop, _ = read_crop(src, 0, src.item_id(0), 32, 16, rng)
    assert crop.shape == (32, 32, 3)
    src.files[1].unlink()
    with pytest.raises(ImageSkipped) as e:
        read_crop(src, 1, src.item_id(1), 32, 16, rng)
    assert e.value.kind == "skipped_unreadable" and "FileNotFoundError" in str(e.value)


def test_corrupt_file_lines_name_the_file_and_the_tar_member(tmp_path, caplog):
    """A corrupt image's line names where it is: the file of a folder, the shard and the member
    of a tar; never PIL's in-memory buffer (`<_io.BytesIO object at 0x...>`)."""
    folder = _good_folder(tmp_path / "imgs", 3)
    (folder / "b" / "broken.jpg").write_bytes(b"junk" * 50)  # PIL: "cannot identify image file"
    shard = _tar(tmp_path / "s.tar", [("k0.png", _png_bytes(0)), ("dir/bad.jpg", b"junk" * 50),
                                      ("k2.png", _png_bytes(2))])
    for over, want in ((["data.source='folder'", f"data.path='{folder}'"],
                        str(folder / "b" / "broken.jpg")),
                       (["data.source='webdataset'", f"data.path='{shard}'"], f"{shard}:dir/bad.jpg")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="framer_dist.data"):
            pipe = build_dataloader(_cfg(*over), 0, 1, 0)
            _ids(pipe, 4)  # 8 positions: every item of the epoch
        lines = [r.getMessage() for r in caplog.records if "skipped_corrupt" in r.getMessage()]
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"data: skipped_corrupt: {want} (UnidentifiedImageError: "), lines
        assert "BytesIO" not in lines[0] and "0x" not in lines[0], lines


def test_bmp_and_tiff_images_are_training_data_in_folders_and_shards(tmp_path):
    """One extension list (data/images.py IMAGE_EXTS) for every reader: .bmp/.tif/.tiff, which
    framer-sr and the demo already read, are training data too (a 16-bit TIFF is scaled to 8 bits
    like a 16-bit PNG)."""
    import io

    from framer_dist.data.images import IMAGE_EXTS
    from framer_dist.infer import io as infer_io

    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(_rgb(0)).save(root / "a.bmp")
    Image.fromarray(_rgb(1)).save(root / "b.tif")
    Image.fromarray((_rgb(2)[..., 0].astype(np.uint16) * 257)).save(root / "c.TIFF")   # mode I;16
    pipe = build_dataloader(_cfg("data.source='folder'", f"data.path='{root}'", "data.batch_size=3"), 0, 1, 0)
    assert sorted(_ids(pipe, 1)) == ["a", "b", "c"]
    assert pipe.report.as_dict() == {"converted_16bit": 1}

    def enc(img: np.ndarray, fmt: str) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, fmt)
        return buf.getvalue()

    shard = _tar(tmp_path / "s.tar", [("k0.bmp", enc(_rgb(0), "BMP")), ("k1.tiff", enc(_rgb(1), "TIFF")),
                                      ("k2.png", _png_bytes(2))])
    pipe = build_dataloader(_cfg("data.source='webdataset'", f"data.path='{shard}'", "data.batch_size=3"),
                            0, 1, 0)
    assert sorted(_ids(pipe, 1)) == ["k0", "k1", "k2"]
    assert not pipe.report.as_dict()                           # no skipped_no_image
    assert infer_io.IMAGE_EXTS is IMAGE_EXTS                   # framer-sr lists the same files
