"""A byte-level tokenizer in Hugging Face format: token id = byte value.

Ids 0..255 are the 256 bytes (spelled with GPT-2's printable byte alphabet so the
vocabulary file is valid JSON text); id 256 is `<|endoftext|>`, used as BOS, EOS
and padding. Any UTF-8 text round-trips, and `AutoTokenizer.from_pretrained`
loads it like any hub tokenizer.

Called with its defaults the tokenizer puts BOS first, as every training window
had it, so a plain transformers user measures what the model card says;
`add_special_tokens=False` gives exactly the bytes (LayerScope's own windows add
BOS themselves).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers.processors import TemplateProcessing

BOS_TOKEN = "<|endoftext|>"
BOS_ID = 256
BYTE_VOCAB_SIZE = 257


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def bos_post_processor(bos_token: str, bos_id: int) -> TemplateProcessing:
    """The `tokenizers` template that puts BOS before the text (and once before a
    pair, whose texts follow each other as in one training window).

    It lives in tokenizer.json, which is what every loader reads: transformers v5
    does not save `add_bos_token` and keeps the file's post-processor on load.
    """
    from tokenizers import processors

    return processors.TemplateProcessing(
        single=f"{bos_token} $A", pair=f"{bos_token} $A $B:1", special_tokens=[(bos_token, bos_id)])


def build_byte_tokenizer(model_max_length: int):
    """A `PreTrainedTokenizerFast` whose ids are raw bytes plus BOS = 256, which it
    prepends unless called with `add_special_tokens=False`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    vocab[BOS_TOKEN] = BOS_ID
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([BOS_TOKEN])
    core.post_processor = bos_post_processor(BOS_TOKEN, BOS_ID)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS_TOKEN,
        eos_token=BOS_TOKEN,
        pad_token=BOS_TOKEN,
        unk_token=None,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def save_byte_tokenizer(folder: Path, model_max_length: int) -> None:
    build_byte_tokenizer(model_max_length).save_pretrained(str(folder))
