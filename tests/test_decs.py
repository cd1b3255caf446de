"""DeCS (docs/algorithms.md#decs): the token-level tail rule against values computed by hand, its
promises on random batches, and the answer detector against a scan of every prefix."""

import random

import pytest
import torch

from efficient_rl.algos.decs import decs_advantages, redundant_share, redundant_tokens
from efficient_rl.data.answers import extract_answer
from efficient_rl.scoring.answer_reached import answer_ends, candidate_cuts, prefix_text_ends

# ---------------------------------------------------------------- the tail rule, by hand


def test_tail_rule_by_hand():
    # Row 0: correct, answer reached after 2 of its 4 tokens, A = +1.5 -> tail min(1.5, 0) - 0.2 = -0.2.
    # Row 1: correct, A = -0.5, answer after 1 of 3 tokens -> tail -0.5 - 0.2 = -0.7; padding stays 0.
    # Row 2: wrong, prefix end given as 1, but a wrong rollout is never shaped.
    # Row 3: correct with answer_end = its length (4): nothing redundant.
    advantages = torch.tensor(
        [[1.5, 1.5, 1.5, 1.5], [-0.5, -0.5, -0.5, 0.0], [-1.0, -1.0, -1.0, -1.0], [0.3, 0.3, 0.3, 0.3]]
    )
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    answer_end = torch.tensor([2, 1, 1, 4])
    correct = torch.tensor([1.0, 1.0, 0.0, 1.0])
    shaped = decs_advantages(advantages, mask, answer_end, correct, penalty=0.2)
    expected = [[1.5, 1.5, -0.2, -0.2], [-0.5, -0.7, -0.7, 0.0], [-1.0] * 4, [0.3] * 4]
    assert torch.allclose(shaped, torch.tensor(expected))
    # Redundant tokens: 2 of row 0, 2 of row 1; correct rows hold 4 + 3 + 4 = 11 response tokens.
    assert redundant_tokens(mask, answer_end, correct).sum().item() == 4
    assert redundant_share(mask, answer_end, correct) == pytest.approx(4 / 11)


def test_tail_rule_keeps_token_level_advantages_in_the_prefix():
    # TEMPO-like advantages vary along the row: the prefix keeps each value, the tail takes min(A, 0) - p.
    advantages = torch.tensor([[0.4, -0.2, 0.9, -0.3, 0.0]])
    shaped = decs_advantages(advantages, torch.ones(1, 5), torch.tensor([2]), torch.tensor([1.0]), penalty=0.1)
    assert torch.allclose(shaped, torch.tensor([[0.4, -0.2, -0.1, -0.4, -0.1]]))


def test_no_tail_leaves_advantages_bit_for_bit():
    advantages = torch.randn(3, 6)
    mask = torch.ones(3, 6)
    shaped = decs_advantages(advantages, mask, torch.tensor([6, 6, 6]), torch.ones(3), penalty=0.5)
    assert torch.equal(shaped, advantages)
    assert redundant_share(mask, torch.tensor([6, 6, 6]), torch.ones(3)) == 0.0


# ---------------------------------------------------------------- promises on random batches


def random_batch(generator: torch.Generator, rows: int = 12, width: int = 20):
    lengths = torch.randint(1, width + 1, (rows,), generator=generator)
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).float()
    advantages = torch.randn(rows, width, generator=generator) * mask
    answer_end = (torch.rand(rows, generator=generator) * (lengths + 1).float()).long().clamp(max=lengths)
    correct = (torch.rand(rows, generator=generator) < 0.6).float()
    return advantages, mask, answer_end, correct


@pytest.mark.parametrize("seed", range(20))
def test_prefix_tokens_of_a_correct_rollout_never_lose_advantage(seed):
    generator = torch.Generator().manual_seed(seed)
    advantages, mask, answer_end, correct = random_batch(generator)
    penalty = float(torch.rand(1, generator=generator)) * 2
    shaped = decs_advantages(advantages, mask, answer_end, correct, penalty=penalty)
    prefix = torch.arange(mask.shape[1]).unsqueeze(0) < answer_end.unsqueeze(1)
    assert torch.equal(shaped[prefix], advantages[prefix])
    assert torch.equal(shaped[correct == 0], advantages[correct == 0])  # wrong rollouts untouched
    # And every redundant token ends up strictly negative, at most -penalty.
    redundant = redundant_tokens(mask, answer_end, correct)
    assert (shaped[redundant] <= -penalty + 1e-7).all()


@pytest.mark.parametrize("seed", range(20))
def test_a_longer_redundant_tail_never_earns_a_higher_total(seed):
    # The same rollout (same advantages) with its answer reached earlier, i.e. a longer redundant tail:
    # its total advantage never rises, and falls by at least `penalty` per extra redundant token.
    generator = torch.Generator().manual_seed(seed)
    width = 16
    base = torch.randn(1, width, generator=generator, dtype=torch.float64)
    mask = torch.ones(1, width)
    penalty = 0.05 + float(torch.rand(1, generator=generator))
    totals = [
        float(decs_advantages(base, mask, torch.tensor([end]), torch.tensor([1.0]), penalty).sum())
        for end in range(width, -1, -1)  # tail length 0, 1, ..., width
    ]
    for shorter, longer in zip(totals, totals[1:]):
        assert longer <= shorter - penalty + 1e-6


def test_without_min_a_short_tail_would_be_rewarded():
    # Why the tail takes min(A, 0): with A = +2 (a short correct answer in its group) and a small
    # penalty, A - penalty would still push the redundant tokens up; the rule makes them negative.
    shaped = decs_advantages(torch.full((1, 4), 2.0), torch.ones(1, 4), torch.tensor([2]), torch.tensor([1.0]), 0.1)
    assert shaped[0, 2:].tolist() == pytest.approx([-0.1, -0.1])
    assert 2.0 - 0.1 > 0


# ---------------------------------------------------------------- the detector against every prefix

WORDS = [
    "7",
    " + ",
    "5",
    " = ",
    "12",
    ".",
    " Wait",
    ",",
    " check",
    ":",
    "\\boxed{",
    "}",
    "1",
    "2",
    " The answer is ",
    "<eos>",
]


def decode_words(ids: list[int]) -> str:
    """A tokenizer whose tokens are the words above; the EOS decodes to nothing (skip_special_tokens)."""
    return "".join("" if WORDS[i] == "<eos>" else WORDS[i] for i in ids)


def decode_stripped(ids: list[int]) -> str:
    """A decoder that strips the text's leading space: tokens decoded alone no longer join up."""
    return decode_words(ids).lstrip(" ")


def verifier(fallback_last_number: bool = True):
    """The math reward's reading: the last boxed answer, else (with the fallback) the last number."""

    def accepts(texts: list[str], samples: list[dict]) -> list[bool]:
        answers = [extract_answer(text, fallback_last_number=fallback_last_number) for text in texts]
        return [answer == sample["answer"] for answer, sample in zip(answers, samples)]

    return accepts


def scan_every_prefix(ids, sample, decode, accepts) -> int:
    """The brute force: score the prefix of every length, return the first accepted one."""
    for k in range(1, len(ids) + 1):
        if accepts([decode(ids[:k])], [sample])[0]:
            return k
    return len(ids)


def word_ids(*words: str) -> list[int]:
    return [WORDS.index(word) for word in words]


HAND_MADE = [
    # answer reached at "12" (5 tokens), then a redundant check, then the boxed answer and EOS.
    word_ids("7", " + ", "5", " = ", "12", ".", " Wait", ",", " check", ":", "\\boxed{", "12", "}", "<eos>"),
    # boxed right away: the answer is reached at the closing brace.
    word_ids("\\boxed{", "12", "}", ".", "<eos>"),
    # a digit at a time: "1" is no answer, "1"+"2" is (the cut falls inside a number).
    word_ids(" The answer is ", "1", "2", ".", " Wait", ",", " check", ":", " The answer is ", "12", "<eos>"),
    # a wrong number first, then the right one.
    word_ids("7", " + ", "5", " = ", "7", " check", ":", "12", "<eos>"),
    # never accepted by this verifier (answer 5 elsewhere): the full length.
    word_ids("7", " + ", "5", " = ", "12", "<eos>"),
]


# By hand, with the last-number fallback: the first "12" of each ("\\boxed{12" unclosed already reads
# as the number 12), and the full length of the last; boxed answers only: each closing brace, else
# the full length.
BY_HAND = {True: [5, 2, 3, 8, 6], False: [13, 3, 11, 9, 6]}


@pytest.mark.parametrize("fallback", [True, False])
@pytest.mark.parametrize("decode", [decode_words, decode_stripped])
def test_detector_matches_a_scan_of_every_prefix(decode, fallback):
    samples = [{"answer": "12"}] * 4 + [{"answer": "99"}]
    accepts = verifier(fallback)
    expected = [scan_every_prefix(ids, sample, decode, accepts) for ids, sample in zip(HAND_MADE, samples)]
    assert expected == BY_HAND[fallback]
    assert answer_ends(HAND_MADE, samples, [True] * 5, decode, accepts) == expected


def test_detector_leaves_wrong_rollouts_whole_and_calls_the_verifier_less():
    calls = []

    def counting(texts, samples):
        calls.extend(texts)
        return verifier()(texts, samples)

    correct = [True, False, True, True, True]
    ends = answer_ends(HAND_MADE, [{"answer": "12"}] * 5, correct, decode_words, counting)
    assert ends[1] == len(HAND_MADE[1])  # wrong: no tail, never scored
    assert ends[0] == 5
    assert len(calls) < sum(len(ids) for i, ids in enumerate(HAND_MADE) if correct[i]) // 2


@pytest.mark.parametrize("fallback", [True, False])
def test_detector_on_random_word_responses_matches_the_scan(fallback):
    # Random text finds what hand-made cases miss: "\\boxed{" opening an unclosed box makes the math
    # reading fall back to the last number, so a prefix ending in "{" can be the first accepted one.
    rng = random.Random(0)
    responses = [
        [rng.randrange(len(WORDS) - 1) for _ in range(rng.randint(1, 25))] + [len(WORDS) - 1] for _ in range(600)
    ]
    samples = [{"answer": rng.choice(["12", "5", "7", "2"])} for _ in responses]
    accepts = verifier(fallback)
    expected = [scan_every_prefix(ids, sample, decode_words, accepts) for ids, sample in zip(responses, samples)]
    assert answer_ends(responses, samples, [True] * len(responses), decode_words, accepts) == expected
    assert any(end < len(ids) for end, ids in zip(expected, responses))  # the sample exercises real cuts


def test_prefix_text_ends_and_candidates_by_hand():
    ids = word_ids("7", " = ", "\\boxed{", "12", "}", "<eos>")
    assert prefix_text_ends(ids, decode_words) == [1, 4, 11, 13, 14, 14]
    # Cuts: after "7" (digit), "\\boxed{" (an unclosed box hides earlier ones), "12" and "}"; the EOS
    # adds no text and is no cut of its own.
    assert candidate_cuts(decode_words(ids), [1, 4, 11, 13, 14, 14]) == [1, 3, 4, 5]


# ---------------------------------------------------------------- the recipe field and a training run


def two_digit_reward(completion, sample):
    """Correct once the text holds two digits: the tiny lab model rarely answers its prompt right,
    but writes digits early and goes on, so its correct rollouts have a redundant tail."""
    correct = float(sum(character.isdigit() for character in completion) >= 2)
    return {"score": correct, "accuracy": correct}


def test_a_negative_penalty_is_refused_naming_the_field():
    from conftest import RECIPES
    from efficient_rl.config.loading import load_recipe
    from efficient_rl.driver.validate import validate
    from efficient_rl.errors import ConfigError

    with pytest.raises(ConfigError, match=r"algorithm\.token_shaping.*penalty"):
        validate(load_recipe(RECIPES / "quickstart.yaml", ["algorithm.token_shaping={name: decs, penalty: -0.5}"]))


def test_decs_end_to_end_penalises_the_tail_of_correct_rollouts(tmp_path, tiny_overrides):
    import json

    from conftest import RECIPES
    from efficient_rl.config.loading import load_recipe
    from efficient_rl.driver.loop import run_recipe

    common = tiny_overrides + [
        "steps=2",
        "eval.before_training=false",
        "eval.after_training=false",
        "logging.trackers=[]",
        "reward=[{name: 'test_decs:two_digit_reward'}]",
    ]

    def metrics(name, *overrides):
        run, summary = run_recipe(
            load_recipe(RECIPES / "quickstart.yaml", [*common, f"logging.name={name}", *overrides])
        )
        assert summary["steps_completed"] == 2
        return [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]

    plain = metrics("plain")
    shaped = metrics("decs", "algorithm.token_shaping={name: decs, penalty: 0.5}")
    # The same first step's rollouts (same seed, same weights): only the advantages differ.
    for key in ("score/mean", "acc/mean", "response_length/mean", "reward/mean"):
        assert shaped[0][key] == plain[0][key]
    assert 0.0 < shaped[0]["acc/mean"]
    assert 0.0 < shaped[0]["decs/redundant_share"] < 1.0  # correct rollouts go on after their second digit
    assert "decs/redundant_share" not in plain[0]
    # The first update starts on-policy (ratio 1), where the loss is minus the advantages' token mean: DLER's
    # whitened advantages average to 0, and DeCS only lowers advantages, strictly on the redundant tokens.
    assert plain[0]["loss"] == pytest.approx(0.0, abs=1e-6)
    assert shaped[0]["loss"] > 0.1


def test_the_entry_reads_the_batch_and_answer_end_survives_select_concat_and_save(tmp_path):
    from test_algorithms import make_batch

    from efficient_rl.algos.batch import RolloutBatch
    from efficient_rl.algos.decs import TOKEN_SHAPERS

    batch = make_batch([1.0, 0.0, 1.0], [0, 0, 1], [4, 3, 2])
    batch.scores = torch.tensor([1.0, 0.0, 2.0])  # no accuracy field: a positive score is correct
    batch.advantages = torch.tensor([[0.5, 0.5, 0.5, 0.5], [-0.5, -0.5, -0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    batch.answer_end = torch.tensor([1, 3, 2])
    shaped = TOKEN_SHAPERS.get("decs").bind()(batch)  # the default penalty, 0.1
    expected = [[0.5, -0.1, -0.1, -0.1], [-0.5, -0.5, -0.5, 0.0], [0.0, 0.0, 0.0, 0.0]]
    assert torch.allclose(shaped, torch.tensor(expected))
    assert TOKEN_SHAPERS.get("decs").bind().metrics(batch) == {"decs/redundant_share": pytest.approx(3 / 6)}
    assert torch.equal(TOKEN_SHAPERS.get("none").bind()(batch), batch.advantages)
    # The field travels with its rows: selected, concatenated (rounds of a step), saved (in-flight batches).
    picked = RolloutBatch.concat([batch.select([2, 0]), batch.select([1])])
    assert picked.answer_end.tolist() == [2, 1, 3]
    torch.save([picked], tmp_path / "in_flight.pt")
    assert torch.load(tmp_path / "in_flight.pt", weights_only=False)[0].answer_end.tolist() == [2, 1, 3]
