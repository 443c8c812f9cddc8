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


# scaled / soft-capped LM heads (lpreg.logit_transform): the config attribute of each family
HEAD_FAMILIES = {
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=8, final_logit_softcapping=30.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=8, final_logit_softcapping=30.0)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.25)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=4.0)),
}


def tiny_family(name: str, seed: int = 0):
    """A 1-layer model of a family whose head scales or soft-caps its logits (HEAD_FAMILIES), fp32, untied,
    the head spread as tiny_model's (so the soft-cap / scale changes the log-probs by O(1))."""
    import transformers

    cfg_name, model_name, extra = HEAD_FAMILIES[name]
    tok = tiny_tokenizer()
    cfg = getattr(transformers, cfg_name)(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model.float()


def tiny_edited_head(seed: int = 0, shift: float = 2.0):
    """A 1-layer Llama subclass (tiny_model's sizes) that adds `shift` to one token's logit in forward(): a head
    change no config attribute describes (the fused path's guard must catch it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    class EditedHeadLlama(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            if getattr(out, "logits", None) is not None:
                out.logits = out.logits + shift * (torch.arange(out.logits.shape[-1]) == 5).to(out.logits)
            return out

    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = EditedHeadLlama(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model.float()
