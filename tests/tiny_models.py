"""Tiny random decoder models built from configs, locally (no downloads)."""

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Llama4ForCausalLM,
    Llama4TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from zipkv import cache_kwargs

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**{**COMMON, **overrides}))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**{**COMMON, **overrides}))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**{**COMMON, "sliding_window": None, **overrides}))
    elif arch == "gemma3":
        settings = dict(COMMON, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
        model = Gemma3ForCausalLM(Gemma3TextConfig(**{**settings, **overrides}))
    elif arch == "llama4":  # chunked attention (attention_chunk_size); no_rope_layers[i] == 0: a full layer
        settings = dict(COMMON, head_dim=16, intermediate_size_mlp=128, num_local_experts=2, moe_layers=[],
                        attention_chunk_size=16, no_rope_layers=[1, 0])
        model = Llama4ForCausalLM(Llama4TextConfig(**{**settings, **overrides}))
    else:
        raise ValueError(arch)
    return model.eval()


ARCHS = ("llama", "qwen2", "mistral", "gemma3")


def padded_batch(length: int = 48, pad: int = 6, seed: int = 1, batch: int = 2):
    """(input_ids, attention_mask) of random tokens; row 1 left-padded by `pad` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[1, :pad], mask[1, :pad] = 0, 0
    return ids, mask


def generate_new_tokens(model, cache, ids, mask, new_tokens: int):
    """model.generate's greedy new tokens [B, new_tokens] with `cache` (no grad)."""
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=new_tokens,
                             do_sample=False)
    return out[:, ids.shape[1]:]


def word_tokenizer(sentences):
    """A word-level fast tokenizer trained on `sentences` ([UNK] 0, [PAD] 1, [EOS] 2), offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    backend.train_from_iterator(sentences, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def save_word_checkpoint(directory, sentences, arch: str = "llama", **overrides):
    """A random tiny model and a word-level tokenizer of `sentences`, saved in `directory` like
    any local checkpoint (config.json, safetensors, tokenizer files); returns the directory."""
    tokenizer = word_tokenizer(sentences)
    model = tiny_model(arch, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **overrides)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
