"""core.tasks: the seeding, length-split naming and prompt tokenization tasks share."""

import pytest
import torch

from hybridlab.core.errors import HybridlabError
from hybridlab.core.tasks import Vocabulary, decode, encode, generator, length_splits, split_length


def test_generator_depends_on_seed_split_and_index_only():
    def draw(*key):
        return int(torch.randint(0, 2**31, (1,), generator=generator(*key)))

    assert draw(1, "train", 5) == draw(1, "train", 5)
    assert len({draw(1, "train", 5), draw(2, "train", 5), draw(1, "len8", 5), draw(1, "train", 6)}) == 4


def test_length_splits_round_trip():
    assert length_splits([8, 64]) == ["len8", "len64"]
    assert [split_length(s) for s in ["len8", "len64", "eval", "len", "len8x"]] == [8, 64, None, None, None]


def test_vocabulary_reads_names_or_ids_and_says_what_it_knows():
    vocab = Vocabulary(["<pad>", "give", "g0", "g1"])
    assert vocab.encode("give g1 0 3") == [1, 3, 0, 3]
    assert vocab.decode([1, 2, 9]) == "give g0 <9>"
    with pytest.raises(HybridlabError, match=r"unknown token 'g7' in the prompt; this task's tokens are <pad>, give"):
        vocab.encode("give g7")


def test_default_tokenization_is_whitespace_separated_ids():
    class Plain:
        pass

    assert encode(Plain(), " 3 1\n4 ") == [3, 1, 4]
    assert decode(Plain(), [3, 1, 4]) == "3 1 4"
    with pytest.raises(HybridlabError, match="whitespace-separated token ids"):
        encode(Plain(), "three")
