"""Tiny random vision-language models and synthetic image prompts, built locally.

No weights and no processor files are downloaded. Each model has its real vision tower at
toy sizes; inputs are what the model's processor would output for random images:
- LLaVA / LLaVA-NeXT: the real transformers processor (PIL image processor + an in-memory
  word-level tokenizer), which expands every `<image>` into the right number of image tokens
  (LLaVA-NeXT's count depends on each image's size: anyres tiling).
- Qwen2-VL / Qwen2.5-VL: the real PIL image processor for `pixel_values` and
  `image_grid_thw`; the token expansion and `mm_token_type_ids` are done here exactly as
  `Qwen2VLProcessor` does them (its constructor needs torchvision for the video processor).
"""

from __future__ import annotations

import numpy as np
import torch

from ..transformers_support import cache_kwargs

ARCHS = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")

PAD, BOS, EOS = 0, 1, 2
SPECIAL = {"<image>": 250, "<|image_pad|>": 251, "<|video_pad|>": 252, "<|vision_start|>": 253, "<|vision_end|>": 254}
VOCAB_SIZE = 256
WORDS = [f"w{i}" for i in range(3, 250)]  # word "wN" has id N

TEXT = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=PAD,
)
CLIP = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
    projection_dim=32,
)
QWEN_VISION = dict(depth=2, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
MROPE = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])  # sums to head_dim / 2 = 8


def tiny_vlm(arch: str, seed: int = 0, **text_overrides):
    """A random VLM of family `arch` (one of ARCHS), eval mode, generation without EOS."""
    import transformers as tf

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS} (got {arch!r})")
    torch.manual_seed(seed)
    text = {**TEXT, **text_overrides}
    if arch in ("llava", "llava_next"):
        common = dict(
            vision_config=tf.CLIPVisionConfig(**CLIP),
            text_config=tf.LlamaConfig(**text),
            image_token_id=SPECIAL["<image>"],
            vision_feature_select_strategy="default",
        )
        if arch == "llava":
            model = tf.LlavaForConditionalGeneration(tf.LlavaConfig(image_seq_length=16, **common))
        else:
            config = tf.LlavaNextConfig(image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]], **common)
            model = tf.LlavaNextForConditionalGeneration(config)
    else:
        ids = dict(
            image_token_id=SPECIAL["<|image_pad|>"],
            video_token_id=SPECIAL["<|video_pad|>"],
            vision_start_token_id=SPECIAL["<|vision_start|>"],
            vision_end_token_id=SPECIAL["<|vision_end|>"],
        )
        text = {**text, "rope_parameters": dict(MROPE)}
        if arch == "qwen2_vl":
            vision = dict(QWEN_VISION, embed_dim=32)
            model = tf.Qwen2VLForConditionalGeneration(tf.Qwen2VLConfig(text_config=text, vision_config=vision, **ids))
        else:
            vision = dict(
                QWEN_VISION, intermediate_size=64, out_hidden_size=text["hidden_size"], window_size=16,
                fullatt_block_indexes=[1],
            )
            config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
            model = tf.Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = None  # random weights: always generate the full length
    model.generation_config.pad_token_id = PAD
    return model.eval()


def tiny_tokenizer():
    """Word-level tokenizer over WORDS and the special tokens, left padding, no files."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, **{w: int(w[1:]) for w in WORDS}, **SPECIAL}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=list(SPECIAL), padding_side="left",
    )


def random_images(sizes, seed: int = 0) -> list[np.ndarray]:
    """uint8 RGB images [H, W, 3] of the given (height, width) sizes."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def random_words(n: int, rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=n))


def image_prompts(arch: str, text_lengths=((6, 5), (2, 3)), image_sizes=((32, 32), (32, 32)), seed: int = 0):
    """Processor-style inputs for a batch: row i is `text_lengths[i][0]` words, one image of
    `image_sizes[i]`, then `text_lengths[i][1]` words; rows of different lengths are left
    padded. Returns a dict of tensors for `model(**inputs)` / `model.generate(**inputs)`."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS} (got {arch!r})")
    if len(text_lengths) != len(image_sizes):
        raise ValueError("text_lengths and image_sizes must have one entry per batch row")
    rng = np.random.default_rng(seed)
    images = random_images(image_sizes, seed)
    if arch in ("llava", "llava_next"):
        return _llava_inputs(arch, images, [(random_words(a, rng), random_words(b, rng)) for a, b in text_lengths])
    return _qwen_inputs(images, [(random_words(a, rng), random_words(b, rng)) for a, b in text_lengths])


def _llava_inputs(arch, images, texts):
    from transformers import LlavaNextProcessor, LlavaProcessor

    crop = {"height": CLIP["image_size"], "width": CLIP["image_size"]}
    shortest = {"shortest_edge": CLIP["image_size"]}
    common = dict(tokenizer=tiny_tokenizer(), patch_size=CLIP["patch_size"], vision_feature_select_strategy="default",
                  num_additional_image_tokens=1)  # CLIP's CLS token, dropped by the "default" strategy
    if arch == "llava":
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        processor = LlavaProcessor(image_processor=LlavaImageProcessorPil(size=shortest, crop_size=crop), **common)
    else:
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        image_processor = LlavaNextImageProcessorPil(
            size=shortest, crop_size=crop, image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]]
        )
        processor = LlavaNextProcessor(image_processor=image_processor, **common)
    prompts = [f"{before} <image> {after}" for before, after in texts]
    return dict(processor(images=images, text=prompts, return_tensors="pt", padding=True))


def _qwen_inputs(images, texts):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    merge = QWEN_VISION["spatial_merge_size"]
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=16 * 16, max_pixels=64 * 64, patch_size=QWEN_VISION["patch_size"], merge_size=merge,
        temporal_patch_size=QWEN_VISION["temporal_patch_size"],
    )
    pixels = image_processor(images=images, return_tensors="pt")
    rows = []
    for (before, after), grid in zip(texts, pixels["image_grid_thw"]):
        # Qwen2VLProcessor.replace_image_token: one <|image_pad|> per merged patch
        n_image = int(grid.prod()) // merge**2
        ids = [int(w[1:]) for w in before.split()] + [SPECIAL["<|vision_start|>"]]
        ids += [SPECIAL["<|image_pad|>"]] * n_image + [SPECIAL["<|vision_end|>"]] + [int(w[1:]) for w in after.split()]
        rows.append(ids)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        attention_mask[i, width - len(ids):] = 1
    # text 0, image 1, video 2, as the processor's return_mm_token_type_ids
    image, video = input_ids == SPECIAL["<|image_pad|>"], input_ids == SPECIAL["<|video_pad|>"]
    mm_token_type_ids = image.int() + 2 * video.int()
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixels["pixel_values"],
        image_grid_thw=pixels["image_grid_thw"],
        mm_token_type_ids=mm_token_type_ids,
    )


def greedy(model, inputs: dict, cache, new_tokens: int, **generate_kwargs):
    """Greedy generate() on `inputs` with `cache`; placeholder ids are never generated, so every
    generated token is text (as with a trained model)."""
    with torch.no_grad():
        return model.generate(
            **inputs, **cache_kwargs(cache), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            suppress_tokens=list(SPECIAL.values()), **generate_kwargs,
        )
