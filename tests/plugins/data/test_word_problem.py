"""data s5 / cyclic / parity: targets against brute-force composition, determinism, splits."""

import itertools

import pytest
import torch

from hybridlab.core.errors import SpecError
from hybridlab.core.interfaces import ModelOutput
from hybridlab.core.spec import load_pipeline
from hybridlab.plugins.data.word_problem import CyclicConfig, ParityConfig, S5Config, WordProblem, s5_table


def compose(a, b):
    """Apply permutation a, then b, to a sequence: s'[i] = s[a[i]], s''[i] = s'[b[i]]."""
    s = list(range(5))
    s1 = [s[a[i]] for i in range(5)]
    return tuple(s1[b[i]] for i in range(5))


def test_s5_table_is_the_symmetric_group():
    perms = list(itertools.permutations(range(5)))
    table = s5_table()
    assert table.shape == (120, 120)
    for a, b in [(3, 77), (119, 5), (64, 64), (1, 118)]:
        assert perms[table[a, b]] == compose(perms[a], perms[b])
    assert (table[0] == table.new_tensor(range(120))).all()  # 0 is the identity
    assert all(len(set(row.tolist())) == 120 for row in table)  # a Latin square: every row a bijection


@pytest.mark.parametrize("config", [S5Config(length=13), CyclicConfig(order=7, length=11), ParityConfig(length=17)])
def test_targets_are_the_prefix_products(config):
    task = WordProblem(config, seed=5)
    batch = task.batch("train", 3, 6)
    assert batch["inputs"].shape == batch["targets"].shape == (6, config.length)
    if isinstance(config, S5Config):
        perms = list(itertools.permutations(range(5)))
        for row_in, row_out in zip(batch["inputs"].tolist(), batch["targets"].tolist()):
            state = tuple(range(5))
            for x, y in zip(row_in, row_out):
                state = compose(state, perms[x])
                assert perms[y] == state
    else:
        order = config.order if isinstance(config, CyclicConfig) else 2
        for row_in, row_out in zip(batch["inputs"].tolist(), batch["targets"].tolist()):
            assert row_out == [sum(row_in[:t + 1]) % order for t in range(len(row_in))]
            assert max(row_in) < order


def test_batches_are_pure_functions_of_seed_split_and_index():
    task = WordProblem(ParityConfig(length=9, eval_lengths=[9, 18]), seed=1)
    again = WordProblem(ParityConfig(length=9, eval_lengths=[9, 18]), seed=1)
    assert task.batch("train", 4, 8)["inputs"].equal(again.batch("train", 4, 8)["inputs"])
    assert not task.batch("train", 4, 8)["inputs"].equal(task.batch("train", 5, 8)["inputs"])
    assert not task.batch("train", 4, 8)["inputs"].equal(task.batch("len9", 4, 8)["inputs"])
    other_seed = WordProblem(ParityConfig(length=9), seed=2)
    assert not task.batch("train", 4, 8)["inputs"].equal(other_seed.batch("train", 4, 8)["inputs"])


def test_eval_splits_are_named_by_length():
    task = WordProblem(S5Config(length=8, eval_lengths=[8, 16, 32]))
    assert task.splits() == ["len8", "len16", "len32"]
    assert task.batch("len32", 0, 2)["inputs"].shape == (2, 32)
    assert WordProblem(S5Config(length=8)).splits() == ["len8"]
    with pytest.raises(KeyError, match="s5 has splits"):
        task.batch("len64", 0, 2)


def test_token_names_round_trip():
    task = WordProblem(S5Config())
    assert task.decode([0, 1, 119]) == "01234 01243 43210"
    assert task.encode("10234 0 43210") == [task.vocabulary.ids["10234"], 0, 119]


def test_pipeline_errors_point_at_the_data_lines(tmp_path):
    model = tmp_path / "m.yaml"
    model.write_text("vocab_size: 64\nd_model: 16\nlayers:\n  - mixer: {kind: attention, heads: 2}\n")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("model: m.yaml\ndata:\n  kind: s5\n  eval_lengths: [8, 0]\n")
    with pytest.raises(SpecError) as info:
        load_pipeline(pipeline)
    assert info.value.lines() == [f"{pipeline}:4: data.eval_lengths: lengths must be positive, got [8, 0]"]
    pipeline.write_text("model: m.yaml\ndata:\n  kind: s5\n")
    with pytest.raises(SpecError, match="p.yaml:2: data: the task uses 120 token ids but model.vocab_size is 64"):
        load_pipeline(pipeline)


def test_accuracy_last_scores_the_final_position_only():
    task = WordProblem(CyclicConfig(order=3, length=5))
    batch = task.batch("train", 0, 8)
    logits = torch.nn.functional.one_hot(batch["targets"], 3).float()  # [B, T, 3], right everywhere
    assert task.metrics(ModelOutput(logits), batch)["accuracy_last"] == 1.0
    logits[:, :-1] = logits[:, :-1].flip(-1)  # wrong (or lucky) before the end: no change
    assert task.metrics(ModelOutput(logits), batch)["accuracy_last"] == 1.0
    logits[:4, -1] = torch.nn.functional.one_hot((batch["targets"][:4, -1] + 1) % 3, 3).float()
    assert task.metrics(ModelOutput(logits), batch)["accuracy_last"] == 0.5


# ---------------------------------------------------------------- word_problem: any group by name


from hybridlab.plugins.data.word_problem import WordProblemConfig  # noqa: E402


def brute_force_group(name):
    """Elements as tuples of factor elements (permutations as tuples, Z_m as ints), in the
    documented id order, and their product, computed independently of the task's tables."""
    factors = []
    for part in name.split("x"):
        letter, n = part[0], int(part[1:])
        if letter == "Z":
            factors.append((list(range(n)), lambda a, b, n=n: (a + b) % n))
        else:
            perms = list(itertools.permutations(range(n)))
            if letter == "A":
                perms = [p for p in perms if sum(p[i] > p[j] for i in range(n) for j in range(i + 1, n)) % 2 == 0]
            factors.append((perms, lambda a, b: tuple(a[b[i]] for i in range(len(a)))))
    elements = list(itertools.product(*[f[0] for f in factors]))

    def mul(x, y):
        return tuple(f[1](a, b) for f, a, b in zip(factors, x, y))

    return elements, mul


@pytest.mark.parametrize("group, order", [("A5", 60), ("S3", 6), ("Z2xZ3xZ4", 24), ("S3xZ2", 12), ("A4", 12),
                                          ("S5", 120)])
def test_word_problem_targets_are_the_prefix_products_of_the_named_group(group, order):
    config = WordProblemConfig(group=group, length=11)
    assert config.min_vocab_size() == order
    task = WordProblem(config, seed=3)
    elements, mul = brute_force_group(group)
    assert len(elements) == order == len(task.vocabulary.names)
    batch = task.batch("train", 2, 5)
    for row_in, row_out in zip(batch["inputs"].tolist(), batch["targets"].tolist()):
        state = elements[0]  # the identity: id 0
        for x, y in zip(row_in, row_out):
            state = mul(state, elements[x])
            assert elements[y] == state
    assert batch["answer"].equal(batch["targets"][:, -1:])


def test_word_problem_s5_is_the_s5_kind_exactly():
    named = WordProblem(WordProblemConfig(group="S5", length=9, eval_lengths=[9, 20]), seed=4)
    s5 = WordProblem(S5Config(length=9, eval_lengths=[9, 20]), seed=4)
    for split in ("train", "len20"):
        a, b = named.batch(split, 7, 3), s5.batch(split, 7, 3)
        assert all(a[k].equal(b[k]) for k in a)
    assert named.vocabulary.names == s5.vocabulary.names


def test_word_problem_is_deterministic_and_extrapolates_in_length():
    task = WordProblem(WordProblemConfig(group="A5", length=8, eval_lengths=[8, 64]), seed=1)
    assert task.splits() == ["len8", "len64"]
    assert task.batch("len64", 0, 2)["inputs"].shape == (2, 64)
    assert task.batch("train", 1, 4)["inputs"].equal(task.batch("train", 1, 4)["inputs"])
    assert not task.batch("train", 1, 4)["inputs"].equal(task.batch("train", 2, 4)["inputs"])


def test_word_problem_token_names_of_a_product():
    task = WordProblem(WordProblemConfig(group="S3xZ2"))
    assert task.decode([0, 1, 11]) == "012.0 012.1 210.1"
    assert task.encode("021.1 3") == [3, 3]


@pytest.mark.parametrize("group, message", [
    ("Q8", "'Q8' in 'Q8' is not a group; write factors S<n>"),
    ("S3xz2", "'z2' in 'S3xz2' is not a group"),
    ("S7", "'S7' in 'S7': S<n> takes 2 <= n <= 6, got 7"),
    ("A2", "'A2' in 'A2': A<n> takes 3 <= n <= 6, got 2"),
    ("S6xZ3", "'S6xZ3' has 2160 elements; at most 2048"),
])
def test_word_problem_bad_group_is_a_located_error(tmp_path, group, message):
    model = tmp_path / "m.yaml"
    model.write_text("vocab_size: 64\nd_model: 16\nlayers:\n  - mixer: {kind: attention, heads: 2}\n")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"model: m.yaml\ndata:\n  kind: word_problem\n  group: {group}\n")
    with pytest.raises(SpecError) as info:
        load_pipeline(pipeline)
    (line,) = info.value.lines()
    assert line.startswith(f"{pipeline}:4: data.group: ") and message in line


def test_word_problem_vocab_must_cover_the_group(tmp_path):
    model = tmp_path / "m.yaml"
    model.write_text("vocab_size: 32\nd_model: 16\nlayers:\n  - mixer: {kind: attention, heads: 2}\n")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("model: m.yaml\ndata:\n  kind: word_problem\n  group: A5\n")
    with pytest.raises(SpecError, match="p.yaml:2: data: the task uses 60 token ids but model.vocab_size is 32"):
        load_pipeline(pipeline)
