"""caption.py, encode_prompts.py and prepare_data.py end to end with tiny random models."""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:", "Describe", "this",
         "image", "and", "its", "style", "in", "a", "very", "detailed", "manner.", "cat", "dog",
         "red", "sky", "the", "blur", "focus", ".", "photo", "of", "house", "tree"]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tokenizer(path: Path, special_image: bool = False) -> None:
    """A word-level fast tokenizer built offline and saved in transformers' format."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if not special_image:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                           special_tokens=[("<s>", 2), ("</s>", 3)])
    extra = {"extra_special_tokens": {"image_token": "<image>"}} if special_image else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                            bos_token="<s>", eos_token="</s>", **extra).save_pretrained(str(path))


def _images(folder: Path, n: int, size: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        small = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size + 8 * i, size), Image.Resampling.BICUBIC).save(folder / f"im{i}.png")
    return folder


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    d = tmp_path_factory.mktemp("llava")
    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=16, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32,
                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                pad_token_id=1, bos_token_id=2, eos_token_id=3),
        image_token_index=4, image_seq_length=4, vision_feature_layer=-1)
    LlavaForConditionalGeneration(cfg).save_pretrained(str(d))
    _tokenizer(d / "tok", special_image=True)
    tok = PreTrainedTokenizerFast.from_pretrained(str(d / "tok"))
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                             crop_size={"height": 16, "width": 16}),
                          tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)
    proc.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> Path:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    d = tmp_path_factory.mktemp("sd3")
    torch.manual_seed(0)
    v = len(WORDS)
    for sub, hidden in (("text_encoder", 8), ("text_encoder_2", 12)):
        CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=v, hidden_size=hidden, intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, projection_dim=16, max_position_embeddings=77,
            bos_token_id=2, eos_token_id=3, pad_token_id=1)).save_pretrained(str(d / sub))
    T5EncoderModel(T5Config(vocab_size=v, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                            pad_token_id=1, eos_token_id=3)).save_pretrained(str(d / "text_encoder_3"))
    for sub in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        _tokenizer(d / sub)
    return d


def test_filter_sentences():
    from framer_dist.data.captioning import filter_sentences

    text = "A red house. The focus is soft! Trees in Blur? A cat sits."
    assert filter_sentences(text) == "A red house. A cat sits."


def test_caption_tool_resumes_and_reports_missing_model(tmp_path, llava_dir, capsys):
    from framer_dist.data.captioning import read_done

    cap = _tool("caption")
    imgs = _images(tmp_path / "imgs", 5)
    (imgs / "broken.png").write_bytes(b"nope")
    out = tmp_path / "captions.jsonl"
    base = ["--images", str(imgs), "--model", str(llava_dir), "--out", str(out),
            "--batch-size", "2", "--max-new-tokens", "5", "--device", "cpu", "--dtype", "fp32"]
    assert cap.main(base + ["--limit", "3"]) == 0              # "interrupted" after 3 (1 unreadable)
    first = read_done(out)
    assert len(first) == 2
    with open(out, "a") as fh:                                          # a line cut off mid-write
        fh.write('{"id": "im4", "capt')
    assert cap.main(base) == 0
    printed = capsys.readouterr().out
    assert "captioned 3 images" in printed and "skipped_corrupt=1" in printed
    done = read_done(out)
    assert sorted(done) == [f"im{i}" for i in range(5)]
    for k, v in first.items():                                          # not redone
        assert done[k] == v
    lines = [ln for ln in out.read_text().splitlines() if ln.startswith('{"id": "im0"')]
    assert len(lines) == 1
    assert all(isinstance(v, str) for v in done.values())
    assert cap.main(base) == 0 and "captioned 0 images" in capsys.readouterr().out

    assert cap.main(["--images", str(imgs), "--model", str(tmp_path / "nope"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "not found" in err


def test_encode_prompts_tool_shapes_resume_and_lookup(tmp_path, sd3_dir, capsys):
    from safetensors.torch import load_file

    from framer_dist.config import load_config
    from framer_dist.data import build_dataloader
    from framer_dist.data.prompts import PromptStore, done_ids
    from framer_dist.models.dit4sr.text import SD3TextEncoders

    enc_tool = _tool("encode_prompts")
    caps = tmp_path / "caps.jsonl"
    texts = {f"im{i}": t for i, t in enumerate(["a red house", "a cat and a dog", "the sky",
                                                "photo of a tree", "a very detailed dog"])}
    caps.write_text("".join(json.dumps({"id": k, "caption": v}) + "\n" for k, v in texts.items()))
    out = tmp_path / "emb"
    base = ["--captions", str(caps), "--model", str(sd3_dir), "--out", str(out), "--t5-len", "8",
            "--batch-size", "2", "--shard-size", "2", "--dtype", "fp32", "--device", "cpu"]
    assert enc_tool.main(base + ["--limit", "3"]) == 0
    assert done_ids(out) == {"im0", "im1", "im2"}
    shard0 = out / "prompts-00000.safetensors"
    stamp = shard0.stat().st_mtime_ns
    assert enc_tool.main(base) == 0
    assert "encoded 2 prompts" in capsys.readouterr().out
    assert shard0.stat().st_mtime_ns == stamp                          # done shards untouched
    assert done_ids(out) == set(texts)

    store = PromptStore(out)
    assert store.shapes == ((77 + 8, 32), (32,))                       # [77 + t5_len, D_t5], 16+16
    enc = SD3TextEncoders(sd3_dir, t5_len=8)
    e, p = enc([texts["im3"], ""])
    got = store.get("im3")
    torch.testing.assert_close(got[0], e[0])
    torch.testing.assert_close(got[1], p[0])
    torch.testing.assert_close(store.empty[0], e[1])
    # the CLIP part is zero-padded from 8 + 12 channels to the T5 width
    assert got[0][:77, 20:].abs().max() == 0 and got[0][:77, :20].abs().max() > 0
    assert load_file(str(out / "empty.safetensors"))["pooled"].shape == (32,)

    # the loader serves them (tiny model preset: 32-wide text, 32 pooled)
    imgs = _images(tmp_path / "imgs", 5)
    cfg = load_config(None, ["data.source='folder'", f"data.path='{imgs}'", "data.resolution=32",
                             "data.min_size=16", "data.batch_size=5", "data.null_prompt_prob=0.0",
                             f"data.prompt_embeddings='{out}'"])
    b = next(iter(build_dataloader(cfg, 0, 1, 0)))
    j = b["ids"].index("im3")
    torch.testing.assert_close(b["prompt_embeds"][j], e[0])

    assert enc_tool.main(["--captions", str(caps), "--model", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err
    # a training cache (no suffix) is not turned into an inference cache by a later run
    assert enc_tool.main(base + ["--inference"]) == 2
    assert "suffix" in capsys.readouterr().err

    # an inference cache: DiT4SR's suffix on every caption, its negative prompt for the CFG branch,
    # served to framer-sr by CachedEmbeddings
    from framer_dist.infer.prompts import NEGATIVE_PROMPT, CachedEmbeddings, with_suffix
    inf = tmp_path / "emb_inference"
    inf_args = [a if a != str(out) else str(inf) for a in base] + ["--inference"]
    assert enc_tool.main(inf_args + ["--limit", "2"]) == 0
    assert enc_tool.main(inf_args) == 0                                # resumes with the same suffix
    cached = CachedEmbeddings(inf)
    e, p = enc([with_suffix(texts["im4"]), NEGATIVE_PROMPT])
    got = cached.cond_for(Path("im4.png"))
    torch.testing.assert_close(got[0][0], e[0])
    torch.testing.assert_close(got[1][0], p[0])
    neg = cached.uncond()
    torch.testing.assert_close(neg[0][0], e[1])
    torch.testing.assert_close(neg[1][0], p[1])
    assert enc_tool.main(inf_args[:-1]) == 2                           # the same without --inference
    assert "suffix" in capsys.readouterr().err                         # no mixing of the two kinds
    partial = tmp_path / "partial"
    (partial / "text_encoder").mkdir(parents=True)
    assert enc_tool.main(["--captions", str(caps), "--model", str(partial), "--out", str(out)]) == 2
    assert "missing text_encoder_2" in capsys.readouterr().err


def test_prepare_data_resumes_is_worker_invariant_and_feeds_cached_source(tmp_path, capsys):
    from safetensors import safe_open

    from framer_dist.config import load_config
    from framer_dist.data import build_dataloader
    from framer_dist.data.prepare import prepare_pairs

    prep = _tool("prepare_data")
    imgs = _images(tmp_path / "imgs", 3)
    out = tmp_path / "cache"
    base = ["--images", str(imgs), "--out", str(out), "--resolution", "32", "--min-size", "16",
            "--passes", "2", "--shard-size", "4", "--batch-size", "4", "--dtype", "fp32"]
    assert prep.main(base + ["--limit-shards", "1"]) == 0               # interrupted after 1 shard
    shards = sorted(out.glob("pairs-*.safetensors"))
    assert [s.name for s in shards] == ["pairs-00000.safetensors"]
    stamp = shards[0].stat().st_mtime_ns
    assert prep.main(base) == 0
    shards = sorted(out.glob("pairs-*.safetensors"))
    assert len(shards) == 2 and shards[0].stat().st_mtime_ns == stamp
    ids = []
    for s in shards:
        with safe_open(str(s), "pt") as f:
            ids += json.loads(f.metadata()["ids"])
            assert f.get_slice("hr_latent").get_shape()[1:] == [16, 4, 4]
    assert sorted(ids) == sorted(f"im{i}#{p}" for i in range(3) for p in range(2))
    assert prep.main(base[:-2] + ["--passes", "3"]) == 2                # other parameters: refused
    assert "other parameters" in capsys.readouterr().err

    # two workers write the same bytes as one
    two = tmp_path / "two"
    for w in range(2):
        prepare_pairs(str(imgs), two, resolution=32, min_size=16, passes=2, shard_size=4,
                      batch_size=4, worker=w, num_workers=2, dtype="fp32")
    for s in shards:
        assert (two / s.name).read_bytes() == s.read_bytes()

    cfg = load_config(None, ["data.source='cached'", f"data.path='{out}'", "data.resolution=32",
                             "data.batch_size=3"])
    batches = list(itertools.islice(build_dataloader(cfg, 0, 1, 0), 2))
    assert batches[0]["hr_latent"].shape == (3, 16, 4, 4)
    assert sorted(i for b in batches for i in b["ids"]) == sorted(f"im{i}" for i in range(3) for _ in range(2))
    assert not torch.equal(batches[0]["hr_latent"], batches[0]["lr_latent"])


def test_encode_prompts_for_the_pisasr_family(tmp_path, capsys):
    """SD2.1's text encoder (pisasr): [77, D] last hidden states, no pooled part; the cache and
    CSD's negative prompt (--negative) come back through the data pipeline's store and the
    family's negative_prompt."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from framer_dist.config import load_config
    from framer_dist.data.prompts import PromptStore
    from framer_dist.models.pisasr.family import negative_prompt
    from framer_dist.models.pisasr.text import SD21TextEncoder

    sd21 = tmp_path / "sd21"
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=16,
                                 num_hidden_layers=2, num_attention_heads=2,
                                 max_position_embeddings=77, bos_token_id=2, eos_token_id=3,
                                 pad_token_id=1)).save_pretrained(str(sd21 / "text_encoder"))
    _tokenizer(sd21 / "tokenizer")
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps({"id": f"im{i}", "caption": t}) + "\n"
                            for i, t in enumerate(["a red house", "a cat and a dog"])))
    out = tmp_path / "emb"
    assert _tool("encode_prompts").main(
        ["--captions", str(caps), "--model", str(sd21), "--family", "pisasr", "--out", str(out),
         "--dtype", "fp32", "--device", "cpu", "--negative", "the sky"]) == 0
    store = PromptStore(out)
    assert store.shapes == ((77, 16), (0,))
    enc = SD21TextEncoder(sd21)
    e, p = enc(["a cat and a dog", "the sky"])
    assert e.shape == (2, 77, 16) and p.shape == (2, 0)
    torch.testing.assert_close(store.get("im1")[0], e[0])
    cfg = load_config(None, ['model.family="pisasr"', 'model.preset="unet-tiny"',
                             'train.mode="sem"', f"data.prompt_embeddings={json.dumps(str(out))}"])
    torch.testing.assert_close(negative_prompt(cfg)[0], e[1])
    with pytest.raises(Exception, match="missing text_encoder"):
        SD21TextEncoder(tmp_path)
