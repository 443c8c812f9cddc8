"""A tiny causal LM and tokenizer built on the spot (no download), for the framework tests.

The tokenizer is a word-level `tokenizers` model over single characters; the model a
1-layer Qwen2 with a 40-token vocabulary and an untied LM head. Both are saved to a
directory so that frameworks that load "from a path" (verl) read them like a hub model.
"""

import os
import string

import torch

CHARS = list(string.ascii_lowercase) + list(string.digits) + ["+", "="]
RESERVED = ["<pad>", "<eos>"]


def tiny_tokenizer():
    """A PreTrainedTokenizerFast: one token per character, whitespace-split, pad and eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(RESERVED + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    out.padding_side = "left"
    return out


def tiny_model(seed: int = 0, tie: bool = False):
    """A 1-layer Qwen2 (hidden 16, vocab 40) in fp32, random weights from `seed`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = tiny_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=tie, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        w = model.lm_head.weight
        w.mul_(40.0)  # spread the logits: a near-uniform init never exercises the min-p filter
        # eos along the mean output direction: ~40% of sampled completions end early, so the
        # completion lengths (and so GRPO's normalisations) differ
        w[tok.eos_token_id] = 16.0 * w[len(RESERVED):].mean(0)
    return model.float()


def save_tiny(path: str, seed: int = 0) -> str:
    """Write the tiny model and tokenizer to `path` (loadable with from_pretrained); returns path."""
    os.makedirs(path, exist_ok=True)
    tiny_model(seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
