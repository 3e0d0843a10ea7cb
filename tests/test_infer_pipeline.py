"""The SR pipeline and the framer-sr CLI end to end on the tiny model (CPU, 2 sampling steps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from framer_dist.config import ModelConfig
from framer_dist.infer.cli import main
from framer_dist.infer.io import InferenceError
from framer_dist.infer.loading import VaeCodec
from framer_dist.infer.pipeline import InferenceOptions, SRPipeline
from framer_dist.infer.prompts import HashedPromptEncoder, read_captions, with_suffix
from framer_dist.infer.tiling import seam_score, tile_borders
from framer_dist.models.dit4sr import build_model, save_control, save_model
from framer_dist.models.dit4sr.checkpoints import detect_kind

SEAM_THRESHOLD = 1.3   # docs/inference.md: border/median gradient ratio of the sampled latent


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                         layers_per_block=1, norm_num_groups=8, sample_size=32)


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny")).eval()
    with torch.no_grad():  # the DiT4SR layers start at zero: give them weight so the LR matters
        for n, p in model.named_parameters():
            if "_control" in n:
                p.add_(torch.randn_like(p) * 0.05)
    vae = _tiny_vae().eval()
    text = HashedPromptEncoder(model.config.joint_attention_dim, model.config.pooled_projection_dim)
    return model, vae, text


def _pipe(parts, **kw):
    model, vae, text = parts
    opts = dict(steps=2, guidance=4.0, scale=2.0, process_size=0, tile=64, overlap=24)
    opts.update(kw)
    return SRPipeline(model, VaeCodec(vae), text, InferenceOptions(**opts))


def _lr(h, w, seed=0):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_same_seed_same_output_and_seed_matters(parts):
    pipe = _pipe(parts)
    lr = _lr(8, 12)
    a = pipe(lr, ["a cat"], seed=3)
    b = pipe(lr, ["a cat"], seed=3)
    c = pipe(lr, ["a cat"], seed=4)
    assert a.shape == (1, 3, 16, 24)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    assert float(a.min()) >= 0 and float(a.max()) <= 1


def test_tiled_and_untiled_agree_when_the_image_fits_one_tile(parts):
    lr = _lr(8, 12, seed=1)          # x2 -> 16x24 px -> latent 8x12 (tiny VAE factor 2)
    untiled = _pipe(parts, tile=64, overlap=24)(lr, ["x"], seed=0)
    exact_tile = _pipe(parts, tile=12, overlap=4)(lr, ["x"], seed=0)
    assert torch.equal(untiled, exact_tile)


def test_large_non_square_image_is_tiled_to_the_right_size_without_seams(parts):
    pipe = _pipe(parts, tile=8, overlap=4, tile_batch=16, scale=1.5, color_fix="wavelet")
    lr = _lr(16, 30, seed=2)         # x1.5 -> 24x45 px -> padded 24x48 -> latent 12x24: 2x5 tiles
    assert pipe.tiles_for(16, 30) == 10
    out = pipe(lr, ["a wide landscape"], seed=0)
    assert out.shape == (1, 3, 24, 45)
    assert torch.isfinite(out).all()
    z = pipe.last_latent
    assert z.shape[-2:] == (12, 24)
    score = seam_score(z, tile_borders(12, 8, 4), tile_borders(24, 8, 4))
    assert score < SEAM_THRESHOLD, score


def test_prompt_helpers(tmp_path):
    assert with_suffix("a dog", "HQ.") == "a dog HQ."
    assert with_suffix("", "HQ.") == "HQ."
    f = tmp_path / "caps.jsonl"
    f.write_text('{"id": "img1.png", "caption": "a cat"}\n{"image": "b", "text": "a bus"}\n')
    caps = read_captions(f)
    assert caps["img1"] == "a cat" and caps["b"] == "a bus"
    f.write_text('{"foo": 1}\n')
    with pytest.raises(InferenceError, match="caps.jsonl:1"):
        read_captions(f)


def _write_png(path, h, w, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def test_cli_full_and_control_exports_and_clear_errors(parts, tmp_path, capsys):
    model, vae, _ = parts
    ckpt = save_model(model, tmp_path / "export" / "diffusers")
    vae.save_pretrained(tmp_path / "vae")
    ctrl = save_control(model, tmp_path / "ctrl")
    _write_png(tmp_path / "in" / "a.png", 8, 12, 0)
    _write_png(tmp_path / "in" / "b.png", 10, 6, 1)
    common = ["--vae", str(tmp_path / "vae"), "--text-encoders", "hashed", "--steps", "2",
              "--scale", "2", "--process-size", "0", "--tile", "8", "--tile-overlap", "4",
              "--no-progress", "--prompt", "a test"]
    assert detect_kind(tmp_path / "export") == ("full", ckpt)
    assert main([str(tmp_path / "in"), str(tmp_path / "out"), "--checkpoint",
                 str(tmp_path / "export")] + common) == 0
    sizes = {p.name: Image.open(p).size for p in sorted((tmp_path / "out").iterdir())}
    assert sizes == {"a.png": (24, 16), "b.png": (12, 20)}
    # a control-layer export on top of a base gives the same model, so the same pixels
    assert main([str(tmp_path / "in" / "a.png"), str(tmp_path / "out_ctrl"), "--checkpoint", str(ctrl),
                 "--base", str(ckpt)] + common) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "a.png")),
                          np.asarray(Image.open(tmp_path / "out_ctrl" / "a.png")))
    capsys.readouterr()
    # clear errors, exit code 2, no traceback
    assert main([str(tmp_path / "in"), str(tmp_path / "o2"), "--checkpoint", str(tmp_path / "nope")] + common) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main([str(tmp_path / "in"), str(tmp_path / "o2"), "--checkpoint", str(ctrl)] + common) == 2
    assert "needs --base" in capsys.readouterr().err
    (tmp_path / "in" / "c.png").write_bytes(b"garbage")
    assert main([str(tmp_path / "in"), str(tmp_path / "o3"), "--checkpoint", str(ckpt)] + common) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "c.png" in err
    assert not (tmp_path / "o3").exists()   # nothing sampled before the bad file was found


def test_cli_lora_export_and_cached_prompt_embeddings(parts, tmp_path, capsys):
    from framer_dist.models.dit4sr.config import LoraConfig
    from framer_dist.data.prompts import write_empty, write_shard
    from framer_dist.models.dit4sr import apply_training_mode, load_pretrained, save_lora

    model, vae, _ = parts
    full = save_model(model, tmp_path / "full")
    lora_model = load_pretrained(full)
    apply_training_mode(lora_model, "lora", LoraConfig(rank=2, alpha=2.0))
    with torch.no_grad():   # LoRA B starts at zero: give the adapter an effect
        for n, p in lora_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    save_lora(lora_model, tmp_path / "lora")
    save_control(lora_model, tmp_path / "lora")
    vae.save_pretrained(tmp_path / "vae")
    _write_png(tmp_path / "in" / "a.png", 8, 12, 0)
    # embeddings cached by tools/encode_prompts.py's format (ids = image stems)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    emb = tmp_path / "emb"
    emb.mkdir()
    write_shard(emb / "prompts-00000.safetensors", ["a"], torch.randn(1, 6, cfg.joint_attention_dim, generator=g),
                torch.randn(1, cfg.pooled_projection_dim, generator=g))
    write_empty(emb, torch.randn(6, cfg.joint_attention_dim, generator=g),
                torch.randn(cfg.pooled_projection_dim, generator=g))
    common = ["--vae", str(tmp_path / "vae"), "--steps", "2", "--scale", "2", "--process-size", "0",
              "--no-progress", "--prompt-embeddings", str(emb)]
    assert main([str(tmp_path / "in"), str(tmp_path / "o_full"), "--checkpoint", str(full)] + common) == 0
    assert main([str(tmp_path / "in"), str(tmp_path / "o_lora"), "--checkpoint", str(tmp_path / "lora"),
                 "--base", str(full)] + common) == 0
    a = np.asarray(Image.open(tmp_path / "o_full" / "a.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "o_lora" / "a.png")).astype(int)
    assert a.shape == b.shape == (16, 24, 3)
    assert np.abs(a - b).max() > 0          # the adapter was applied
    # an image without a cached embedding is named
    _write_png(tmp_path / "in" / "zz.png", 8, 12, 1)
    capsys.readouterr()
    assert main([str(tmp_path / "in"), str(tmp_path / "o3"), "--checkpoint", str(full)] + common) == 2
    assert "no cached prompt embedding for image zz.png" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists()   # found before any sampling


_WORDS = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:", "Describe", "this",
          "image", "and", "its", "style", "in", "a", "very", "detailed", "manner.", "cat", "dog",
          "red", "sky", "the", "blur", "focus", ".", "photo", "of", "Cinematic,", "HQ."]


def _word_tokenizer(path, image_token=False):
    """An offline word-level fast tokenizer in transformers' format (tiny test encoders)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(_WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if not image_token:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                           special_tokens=[("<s>", 2), ("</s>", 3)])
    extra = {"extra_special_tokens": {"image_token": "<image>"}} if image_token else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>", **extra).save_pretrained(str(path))


def test_cli_with_sd3_text_encoders_and_llava_captions(parts, tmp_path):
    """The --text-encoders (CLIP-L/CLIP-G/T5) and --llava paths with tiny random models."""
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModelWithProjection,
                              CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor, PreTrainedTokenizerFast, T5Config, T5EncoderModel)

    model, vae, _ = parts
    torch.manual_seed(0)
    sd3 = tmp_path / "sd3"
    for sub, hidden in (("text_encoder", 8), ("text_encoder_2", 12)):   # pooled 16 + 16 = 32
        CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(_WORDS), hidden_size=hidden, intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, projection_dim=16, max_position_embeddings=77, bos_token_id=2,
            eos_token_id=3, pad_token_id=1)).save_pretrained(str(sd3 / sub))
    T5EncoderModel(T5Config(vocab_size=len(_WORDS), d_model=32, d_kv=8, d_ff=32, num_layers=1,
                            num_heads=2, pad_token_id=1, eos_token_id=3)).save_pretrained(str(sd3 / "text_encoder_3"))
    for sub in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        _word_tokenizer(sd3 / sub)
    llava = tmp_path / "llava"
    LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=16, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(_WORDS), hidden_size=16, intermediate_size=32,
                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                pad_token_id=1, bos_token_id=2, eos_token_id=3),
        image_token_index=4, image_seq_length=4, vision_feature_layer=-1)).save_pretrained(str(llava))
    _word_tokenizer(llava / "tok", image_token=True)
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                      crop_size={"height": 16, "width": 16}),
                   tokenizer=PreTrainedTokenizerFast.from_pretrained(str(llava / "tok")), patch_size=8,
                   vision_feature_select_strategy="default",
                   num_additional_image_tokens=1).save_pretrained(str(llava))
    ckpt = save_model(model, tmp_path / "ckpt")
    vae.save_pretrained(tmp_path / "vae")
    _write_png(tmp_path / "in" / "a.png", 8, 12, 0)
    common = [str(tmp_path / "in"), "--checkpoint", str(ckpt), "--vae", str(tmp_path / "vae"),
              "--text-encoders", str(sd3), "--steps", "2", "--scale", "2", "--process-size", "0",
              "--no-progress", "--positive-suffix", "HQ.", "--negative-prompt", "blur"]
    assert main(common[:1] + [str(tmp_path / "o_prompt")] + common[1:] + ["--prompt", "a red cat"]) == 0
    assert main(common[:1] + [str(tmp_path / "o_llava")] + common[1:] + ["--llava", str(llava)]) == 0
    for d in ("o_prompt", "o_llava"):
        assert Image.open(tmp_path / d / "a.png").size == (24, 16)


def test_lora_run_export_folder_loads_its_control_layers_too(parts, tmp_path):
    """The trainer's LoRA export (checkpoint.export = ["control", "lora"]) is
    export/dit4sr_control.safetensors + export/lora/pytorch_lora_weights.safetensors; loading
    export/ (as docs/inference.md shows) or export/lora must apply both, as the trainer's model."""
    from framer_dist.models.dit4sr.config import LoraConfig
    from framer_dist.infer.loading import load_model
    from framer_dist.models.dit4sr import apply_training_mode, load_pretrained, save_lora

    model, _, _ = parts
    full = save_model(model, tmp_path / "base")
    trained = load_pretrained(full)
    apply_training_mode(trained, "lora", LoraConfig(rank=2, alpha=2.0))
    with torch.no_grad():  # what training changes: the control layers and the adapters
        for n, p in trained.named_parameters():
            if "lora_B" in n or "_control" in n:
                p.add_(torch.randn_like(p) * 0.3)
    export = tmp_path / "export"
    save_control(trained, export)            # as train.write_exports lays them out
    save_lora(trained, export / "lora")
    g = torch.Generator().manual_seed(0)
    x = dict(hidden_states=torch.randn(1, 16, 8, 8, generator=g),
             lr_latent=torch.randn(1, 16, 8, 8, generator=g), timestep=torch.tensor([500.0]),
             encoder_hidden_states=torch.randn(1, 6, 32, generator=g),
             pooled_projections=torch.randn(1, 32, generator=g))
    with torch.no_grad():
        want = trained.eval()(**x).sample
        for ckpt in (export, export / "lora"):
            got = load_model(ckpt, base=full)(**x).sample
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_trainer_export_with_ema_loads_ema_by_default_says_so_and_main_on_request(parts, tmp_path,
                                                                                  capsys):
    """A run with train.ema exports export/transformer (last step) and export/ema/transformer.
    --checkpoint export/ loads the EMA weights by default (the usual convention), --weights main
    the last step's, and framer-sr prints one line naming what it loads."""
    import copy

    from framer_dist.infer.loading import load_model, resolve_checkpoint

    model, vae, _ = parts
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.01)
    export = tmp_path / "export"
    save_model(model, export / "transformer")
    save_model(ema, export / "ema" / "transformer")
    ctrl = tmp_path / "ctrl_export"  # checkpoint.export = ["control"] with train.ema
    save_control(model, ctrl)
    save_control(ema, ctrl / "ema")

    def same(a, b) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    lines: list[str] = []
    got = load_model(export, report=lines.append)
    assert same(got, ema) and not same(got, model)
    assert len(lines) == 1 and str(export / "ema" / "transformer") in lines[0] and "EMA" in lines[0]
    assert same(load_model(export, weights="ema"), ema)
    assert same(load_model(export, weights="main"), model)
    # the control-layer exports follow the same choice
    assert resolve_checkpoint(ctrl)[:2] == ("control", ctrl / "ema" / "dit4sr_control.safetensors")
    assert resolve_checkpoint(ctrl, weights="main")[:2] == ("control",
                                                            ctrl / "dit4sr_control.safetensors")
    # a choice that does not exist is an error, not a silent fallback
    with pytest.raises(InferenceError, match="no EMA export"):
        load_model(export / "transformer", weights="ema")
    with pytest.raises(InferenceError, match="inside an EMA export"):
        load_model(export / "ema" / "transformer", weights="main")

    vae.save_pretrained(tmp_path / "vae")
    _write_png(tmp_path / "in" / "a.png", 8, 8, 0)
    capsys.readouterr()
    assert main([str(tmp_path / "in"), str(tmp_path / "out"), "--checkpoint", str(export),
                 "--weights", "main", "--vae", str(tmp_path / "vae"), "--text-encoders", "hashed",
                 "--steps", "1", "--process-size", "0", "--tile", "8", "--tile-overlap", "4",
                 "--no-progress", "--prompt", "x"]) == 0
    said = [l for l in capsys.readouterr().err.splitlines() if "loading" in l]
    assert len(said) == 1 and str(export / "transformer") in said[0] and "main weights" in said[0]
