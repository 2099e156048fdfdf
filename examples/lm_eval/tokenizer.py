"""Write a word-level tokenizer into an exported model directory, so that tools which load
a tokenizer beside the model (lm-eval-harness's ``hf`` model) can read it. hybridlab's
tasks read token ids; this gives the words of tiny_choice.jsonl the ids 0, 1, 2, ...,
below any vocab_size of 32 or more.

    python examples/lm_eval/tokenizer.py DIR
"""

import sys

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = ["<eos>", "<unk>", "red", "green", "blue", "one", "two", "three", "cat", "dog", "bird", "is", "a", "the",
         "color", "number", "animal", "sky", "grass", "after", "comes", "says", "woof", "meow", "tweet", ":", "?"]


def write(directory: str) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>",
                                        pad_token="<eos>")
    tokenizer.save_pretrained(directory)
    return tokenizer


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/lm_eval/tokenizer.py DIR")
    write(sys.argv[1])
