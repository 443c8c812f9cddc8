"""Character-level tokenizer built in code, so the tiny policy needs no download.

One token per character over printable ASCII (space to "~") plus newline and tab, and
four special tokens: <pad> (id 0), <s> (bos), </s> (eos), <unk>. Other characters map to
<unk>. The tokenizer adds no special tokens on encode (no post-processor): the caller
appends eos where a target needs it, and prompts start without bos, as in the SFT data.
Decoding fuses the characters back with no separators, so for any string over the
vocabulary `decode(encode(s)) == s`, whitespace included.

It is a `transformers.PreTrainedTokenizerFast` and round-trips through
`save_pretrained` / `AutoTokenizer.from_pretrained`. It has no chat template, so
`model.format_prompt` uses its plain template for it.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Printable ASCII minus the form-feed/vertical-tab/carriage-return whitespace, which no
# task string uses; "\n" separates prompt lines and " " separates words.
CHARACTERS = tuple(dict.fromkeys(" \n\t" + string.digits + string.ascii_letters + string.punctuation))


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Return the character-level tokenizer (vocabulary of 4 specials + 97 characters)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Split into single characters, each its own piece; "[\s\S]" also matches newline,
    # which "." would not.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Fuse joins the pieces with no separator (the default WordLevel decoding would insert
    # spaces between tokens).
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
        # a causal LM takes no token_type_ids; transformers < 5 returns them by default, and generate()
        # then refuses the unused argument
        model_input_names=["input_ids", "attention_mask"],
    )
    # Generation with a batch of prompts pads on the left, so that every prompt ends at the
    # last position; the SFT loss masks padding whichever side it is on.
    tokenizer.padding_side = "left"
    return tokenizer
