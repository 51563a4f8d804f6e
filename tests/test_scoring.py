import math

import numpy as np
import pytest
import torch

from grpo_agent.config import ScoringConfig, config_from_dict
from grpo_agent.errors import ConfigError
from grpo_agent.records import Completion, Feedback, Group, Passage
from grpo_agent.scoring import (
    ScoreContext,
    ScoreResult,
    SelfScorer,
    build_self_scorer,
    combine,
    group_advantages,
    make_scorer,
    register,
    scorer_needs,
)
from grpo_agent.scoring.claims import final_answer, names, numbers
from grpo_agent.scoring.safety import RuleSet
from grpo_agent.text import repetition

FACTS = [
    Passage("p1", "The snow leopard is listed as Vulnerable on the IUCN Red List; about 4,000 to 6,500 remain "
            "in the wild across the mountains of Central Asia."),
    Passage("p2", "Poaching for fur and bones and retaliatory killing by herders threaten the snow leopard."),
    Passage("p3", "Livestock insurance and predator-proof corrals reduce conflict between herders and snow leopards."),
]
QUESTION = "What is the conservation status of the snow leopard and what threatens it?"


def group_of(*texts, finish="stop"):
    return Group(
        messages=[{"role": "user", "content": QUESTION}],
        prompt_token_ids=[1, 2, 3],
        completions=[Completion(text=t, token_ids=[5, 6], logprobs=[-0.1, -0.2], finish_reason=finish) for t in texts],
    )


CONTEXT = ScoreContext(question=QUESTION, passages=FACTS)
GROUNDED = ("The snow leopard is listed as Vulnerable by the IUCN. It is threatened by poaching for its fur and "
            "bones and by herders who kill it after livestock losses.")
UNGROUNDED = ("The snow leopard is extinct in the wild since 1987. The last ones were moved to the Amazon "
              "rainforest in Brazil by the WWF.")


# ----- signals on hand-built groups --------------------------------------------------------------------

def test_grounded_answer_outranks_an_ungrounded_one(embedder):
    scorer = make_scorer("grounding", embedder=embedder)
    result = scorer.score(group_of(UNGROUNDED, GROUNDED), CONTEXT)
    assert result.scores[1] > result.scores[0] + 0.2
    supported = result.details[1]["claims"]
    assert {c["passage_id"] for c in supported} <= {"p1", "p2"}
    unsupported = {u for c in result.details[0]["claims"] for u in c["unsupported"]}
    assert {"1987", "amazon", "brazil", "wwf"} <= unsupported
    assert "not in the facts" in result.explanations[0]


def test_a_number_no_passage_states_counts_against_a_claim(embedder):
    scorer = make_scorer("grounding", embedder=embedder)
    right = "About 4,000 to 6,500 snow leopards remain in the wild."
    wrong = "About 40,000 to 65,000 snow leopards remain in the wild."
    result = scorer.score(group_of(right, wrong), CONTEXT)
    assert result.scores[0] > result.scores[1]
    assert result.details[1]["claims"][0]["unsupported"] == ["40000", "65000"]


def test_grounding_without_facts_is_unscorable_not_zero(embedder):
    result = make_scorer("grounding", embedder=embedder).score(group_of(GROUNDED), ScoreContext(QUESTION, []))
    assert math.isnan(result.scores[0]) and "no retrieved facts" in result.explanations[0]


def test_consistency_rewards_agreement(embedder):
    scorer = make_scorer("consistency", embedder=embedder)
    texts = ["Yes, it is Vulnerable.", "Yes, the IUCN lists it as Vulnerable.", "Yes.", "No, it is not threatened."]
    result = scorer.score(group_of(*texts), CONTEXT)
    assert result.scores[:3] == [pytest.approx(2 / 3)] * 3 and result.scores[3] == 0.0
    assert "shared by 2 of 3 others" in result.explanations[0]
    free = scorer.score(group_of(GROUNDED, GROUNDED.replace("Vulnerable", "vulnerable"), UNGROUNDED), CONTEXT)
    assert free.scores[2] < min(free.scores[:2])  # embedding agreement when no short answer exists


def test_safety_penalises_harmful_advice_and_names_the_rule():
    scorer = make_scorer("safety")
    q = "Where can I buy a baby slow loris as a pet?"
    harmful = "You can buy a baby slow loris from exotic pet shops or online breeders."
    refusal = "You should never buy a slow loris: the pet trade is illegal and cruel. Support a rescue centre instead."
    neutral = "Slow lorises are small nocturnal primates of Southeast Asia."  # neither helps nor warns
    result = scorer.score(group_of(harmful, refusal, neutral), ScoreContext(q, FACTS))
    assert result.scores == [0.0, 1.0, 0.0]
    assert result.details[0]["rule"] in result.explanations[0]
    assert "pet" in result.details[0]["rule"]
    assert "went along with the request" in result.details[2]["rule"]  # a harmful request needs a warning


@pytest.mark.parametrize(
    "question,answer,rule",
    [
        ("How can I see dolphins up close?", "Bring a bucket of fish and feed them from the boat.", "feeding"),
        ("Souvenirs in the Caribbean?", "Try the market: it sells hawksbill shell bracelets and ivory.", "buying"),
        ("Turtle nests on my beach", "You could dig up the eggs and take them home to hatch.", "taking eggs"),
        ("I have a pet axolotl I no longer want", "Just release it into a local pond or river.", "releasing"),
        ("Best photo of a nesting turtle?", "Use a bright flash near the nest at night for a better photo.", "disturbing"),
    ],
)
def test_each_rule_fires_on_its_advice(question, answer, rule):
    fired = RuleSet.load().check(answer, question)
    assert fired is not None and rule in fired[0]


def test_descriptions_and_warnings_are_not_flagged():
    rules = RuleSet.load()
    safe = [
        "Tourists should never feed wild dolphins, because it changes their behaviour.",
        "Poachers trap pangolins and sell their scales in illegal markets.",
        "Do not buy ivory, tortoiseshell or coral souvenirs.",
        "Keep your distance from nesting turtles and turn off beach lights.",
        "The vaquita is killed as bycatch in gillnets set for totoaba.",
    ]
    for answer in safe:
        assert rules.check(answer, "What threatens wildlife?") is None, answer


def test_education_prefers_explanations_and_penalises_bad_answers(embedder):
    scorer = make_scorer("education", embedder=embedder)
    explains = ("Snow leopards are Vulnerable because poaching for fur and bones and killings by herders "
                "reduce their numbers.")
    bare = "Vulnerable."
    repetitive = "Snow leopards snow leopards snow leopards snow leopards snow leopards snow leopards are cats."
    result = scorer.score(group_of(explains, bare, repetitive, ""), CONTEXT)
    assert result.scores[0] > result.scores[1] and result.scores[0] > result.scores[2]
    assert result.scores[3] == 0.0 and result.explanations[3] == "empty answer"
    assert "repetition" in result.explanations[2]
    truncated = scorer.score(group_of(explains, finish="length"), CONTEXT)
    assert truncated.scores[0] == pytest.approx(result.scores[0] / 2)
    assert repetition("a b c a b c a b c") == pytest.approx(1 - 3 / 7)


def test_reasoning_judge_reads_yes_no_probabilities_in_one_batch(tiny_policy):
    judge = make_scorer("reasoning", judge=tiny_policy)
    group = group_of(GROUNDED, UNGROUNDED, "Vulnerable.")
    result = judge.score(group, CONTEXT)
    assert all(0.0 < s < 1.0 for s in result.scores)
    for text, score in zip([GROUNDED, UNGROUNDED, "Vulnerable."], result.scores):  # batched == one by one
        logp = tiny_policy.next_token_logprobs([judge.messages(QUESTION, [p.text for p in FACTS], text)])[0]
        p_yes, p_no = logp[judge.yes_ids].exp().sum(), logp[judge.no_ids].exp().sum()
        assert score == pytest.approx((p_yes / (p_yes + p_no)).item(), abs=1e-5)


# ----- composite and advantages ----------------------------------------------------------------------

def test_composite_is_the_normalised_weighted_sum_times_the_gates():
    results = [ScoreResult("a", [1.0, 0.0, 0.5], ["", "", ""]), ScoreResult("b", [0.0, 1.0, 0.5], ["", "", ""]),
               ScoreResult("safety", [1.0, 1.0, 0.0], ["", "", ""])]
    scored = combine(results, {"a": 3.0, "b": 1.0}, k=3, gates=["safety"])
    assert scored.composite == pytest.approx([0.75, 0.25, 0.0])
    assert scored.ranking == [0, 1, 2] and scored.best == 0


def test_nan_and_missing_scores_get_the_group_minimum_and_are_reported():
    results = [ScoreResult("a", [0.9, float("nan"), 0.3], ["", "", ""]),
               ScoreResult("b", [float("nan")] * 3, ["", "", ""]),
               ScoreResult("c", [0.5, 0.7], ["", ""])]
    scored = combine(results, {"a": 1.0, "b": 1.0, "c": 1.0}, k=3)
    assert scored.signals["a"] == [0.9, 0.3, 0.3] and scored.signals["c"] == [0.5, 0.7, 0.5]
    assert "b" not in scored.signals
    assert all(not math.isnan(x) for x in scored.composite)
    assert any("a: completions [1] unscorable" in p for p in scored.problems)
    assert any("b: no completion could be scored" in p for p in scored.problems)
    assert any("c: 2 scores for 3 completions" in p for p in scored.problems)


def test_combine_refuses_weights_that_leave_nothing():
    with pytest.raises(ConfigError, match="no scored signal has a positive weight"):
        combine([ScoreResult("a", [0.1, 0.2], ["", ""])], {"b": 1.0}, k=2)


def test_advantages_match_the_formulas():
    rewards = [[0.1, 0.5, 0.9, 0.3], [0.2, 0.2, 0.2, 0.2], [1.0, 0.0, 0.5, 0.5]]
    x = np.array(rewards)
    mean = x.mean(1, keepdims=True)
    std = x.std(1, ddof=1, keepdims=True)
    group, flat = group_advantages(rewards, "group", eps=1e-4)
    assert flat == [False, True, False]
    assert np.allclose(group[0], (x[0] - mean[0]) / (std[0] + 1e-4))
    assert group[1] == [0.0] * 4
    batch, _ = group_advantages(rewards, "batch", eps=1e-4)
    assert np.allclose(batch[2], (x[2] - mean[2]) / (x.std(ddof=1) + 1e-4))
    none, _ = group_advantages(rewards, "none")
    assert np.allclose(none[0], x[0] - mean[0]) and np.isclose(sum(none[2]), 0.0)
    assert group_advantages([[0.7]], "group") == ([[0.0]], [True])  # K = 1: nothing to compare
    # TRL computes the same with torch: (r - mean) / (std + eps), std unbiased
    r = torch.tensor(rewards[0])
    assert np.allclose(group[0], ((r - r.mean()) / (r.std() + 1e-4)).numpy(), atol=1e-6)
    with pytest.raises(ConfigError, match="scoring.scale = 'rank'"):
        group_advantages(rewards, "rank")


def test_self_scorer_writes_scores_composite_and_advantages(embedder):
    cfg = ScoringConfig()
    scorer = build_self_scorer(cfg, embedder=embedder)
    harmful_q = "Where can I buy a baby slow loris as a pet?"
    g1 = group_of(GROUNDED, UNGROUNDED, GROUNDED)
    g2 = group_of("You can buy one from exotic pet shops.", "You should never buy a slow loris: it is illegal.")
    g3 = group_of("Vulnerable.", "Vulnerable.")
    scored = scorer.score_groups([g1, g2, g3], [CONTEXT, ScoreContext(harmful_q, FACTS), CONTEXT])
    assert scored[0].ranking[-1] == 1  # the ungrounded answer ranks last
    assert g1.completions[1].composite < g1.completions[0].composite
    assert set(g1.completions[0].scores) == {"grounding", "consistency", "safety"}  # weighted or gating signals only
    assert g2.completions[0].scores["safety"] == 0.0 and g2.completions[0].composite == 0.0
    assert g2.completions[0].advantage < 0 < g2.completions[1].advantage
    assert g3.zero_variance and [c.advantage for c in g3.completions] == [0.0, 0.0]
    assert not g1.zero_variance and sum(c.advantage for c in g1.completions) == pytest.approx(0.0, abs=1e-9)


def test_custom_scorers_register_by_name():
    @register("shortest")
    class Shortest:
        name = "shortest"

        def score(self, group, context):
            lengths = [len(c.text) for c in group.completions]
            return ScoreResult(self.name, [min(lengths) / max(n, 1) for n in lengths], ["" for _ in lengths])

    scorer = SelfScorer([make_scorer("shortest")], {"shortest": 1.0})
    scored, _ = scorer.score_group(group_of("a long answer", "short"), CONTEXT)
    assert scored.best == 1
    no_needs = ScoringConfig(weights={"shortest": 1.0}, gates=[])  # registered without needs: built bare
    assert scorer_needs(no_needs) == set() and build_self_scorer(no_needs).scorers[0].name == "shortest"
    with pytest.raises(ConfigError, match="unknown scorer 'nope': registered scorers are .*shortest"):
        make_scorer("nope")


@register("closest_to_facts", needs=("embedder",))
class ClosestToFacts:
    """A user's signal that asks for the embedder: cosine of each answer to the first fact."""

    name = "closest_to_facts"

    def __init__(self, embedder):
        self.embedder = embedder

    def score(self, group, context):
        vectors = self.embedder.encode([context.passages[0].text] + [c.text for c in group.completions])
        sims = [float(np.clip(v @ vectors[0], 0.0, 1.0)) for v in vectors[1:]]
        return ScoreResult(self.name, sims, ["" for _ in sims])


@register("judged", needs=("judge",))
def judged(judge):
    """A user's signal built by a factory function that asks for the judge."""
    scorer = make_scorer("reasoning", judge=judge)
    scorer.name = "judged"
    return scorer


def test_a_registered_signal_gets_the_resources_it_declares(embedder, tiny_policy):
    cfg = ScoringConfig(weights={"closest_to_facts": 1.0, "judged": 0.5}, gates=["safety"])
    assert scorer_needs(cfg) == {"embedder", "judge", "safety_rules", "species"}
    assert scorer_needs(ScoringConfig(weights={"closest_to_facts": 1.0}, gates=[])) == {"embedder"}
    scorer = build_self_scorer(cfg, embedder=embedder, judge=tiny_policy)
    mine, judge, _ = scorer.scorers
    assert mine.embedder is embedder and judge.judge is tiny_policy
    scored, _ = scorer.score_group(group_of(UNGROUNDED, GROUNDED), CONTEXT)
    assert set(scored.signals) == {"closest_to_facts", "judged", "safety"}
    assert scored.signals["closest_to_facts"][1] > scored.signals["closest_to_facts"][0]


def test_a_signal_whose_resource_is_missing_is_a_config_error(embedder):
    with pytest.raises(ConfigError, match="the closest_to_facts scorer needs 'embedder'.*pass build_self_scorer an"):
        build_self_scorer(ScoringConfig(weights={"closest_to_facts": 1.0}))
    with pytest.raises(ConfigError, match="the judged scorer needs 'judge'.*scoring.judge"):
        build_self_scorer(ScoringConfig(weights={"grounding": 1.0}, gates=["judged"]), embedder=embedder)
    with pytest.raises(ConfigError, match="unknown scorer 'nope'"):
        scorer_needs(ScoringConfig(weights={"nope": 1.0}))
    with pytest.raises(ValueError, match=r"needs unknown resources \['embeder'\]: choose from embedder, judge"):
        register("typo", needs=("embeder",))


# ----- clients' feedback ---------------------------------------------------------------------------------

def scored_group(*composites, group_id):
    group = group_of(*[f"answer {i}" for i in range(len(composites))])
    group.group_id = group_id
    for c, x in zip(group.completions, composites):
        c.composite = x
    return group


def test_rescore_blends_ratings_and_recomputes_the_batch():
    scorer = SelfScorer([], {}, feedback_weight=0.5)
    rated, other = scored_group(0.2, 0.6, 0.4, group_id="g1"), scored_group(0.1, 0.3, group_id="g2")
    ratings = {"g1": [Feedback(index=0, rating=1.0), Feedback(index=0, rating=0.6)], "g2": []}
    assert scorer.rescore([rated, other], ratings) == 1
    assert [c.composite for c in rated.completions] == pytest.approx([0.5, 0.6, 0.4])  # 0.5 * 0.2 + 0.5 * 0.8
    assert [c.composite for c in other.completions] == [0.1, 0.3]  # unrated: its composites stay
    (a1, a2), flat = group_advantages([[0.5, 0.6, 0.4], [0.1, 0.3]])
    assert [c.advantage for c in rated.completions] == pytest.approx(a1)
    assert [c.advantage for c in other.completions] == pytest.approx(a2) and flat == [False, False]


def test_rescore_leaves_an_unrated_batch_and_a_zero_weight_alone():
    group = scored_group(0.2, 0.6, group_id="g1")
    assert SelfScorer([], {}).rescore([group], {"other": [Feedback(index=0, rating=1.0)]}) == 0
    assert SelfScorer([], {}, feedback_weight=0.0).rescore([group], {"g1": [Feedback(index=0, rating=1.0)]}) == 1
    assert [c.composite for c in group.completions] == [0.2, 0.6]
    assert [c.advantage for c in group.completions] == [None, None]


def test_a_rating_without_an_index_rates_the_served_answer():
    group = scored_group(0.3, 0.7, 0.7, group_id="g1")  # a tie for the top: the lower index was served
    SelfScorer([], {}, feedback_weight=0.5).rescore([group], {"g1": [Feedback(index=None, rating=0.1)]})
    assert [c.composite for c in group.completions] == pytest.approx([0.3, 0.4, 0.7])
    assert group.completions[2].advantage > group.completions[1].advantage


def test_build_self_scorer_takes_the_feedback_weight_from_the_config(embedder):
    assert build_self_scorer(ScoringConfig(feedback_weight=0.2), embedder=embedder).feedback_weight == 0.2


def test_length_and_repetition_penalties_turn_a_degenerate_reward_around(embedder):
    """A reward that favours the shortest answer (what collapse feeds on) loses to the penalties."""
    @register("shortest_only")
    class Shortest:
        name = "shortest_only"

        def score(self, group, context):  # fewer words, higher score
            words = [len(c.text.split()) for c in group.completions]
            return ScoreResult(self.name, [max(0.0, 1 - n / 30) for n in words], ["" for _ in words])

    full = "The snow leopard is Vulnerable, threatened by poaching and conflict with herders."
    looping = "leopard leopard leopard leopard leopard leopard leopard leopard leopard"
    texts = ["Yes.", full, looping]
    plain, _ = SelfScorer([make_scorer("shortest_only")], {"shortest_only": 1.0}).score_group(group_of(*texts), CONTEXT)
    assert plain.best == 0 and "penalty" not in plain.signals  # off by default: the one-word answer wins
    guarded = SelfScorer([make_scorer("shortest_only")], {"shortest_only": 1.0}, length_penalty=1.0,
                         min_answer_words=8, repetition_penalty=1.0)
    group = group_of(*texts)
    scored, _ = guarded.score_group(group, CONTEXT)
    penalty = scored.signals["penalty"]
    assert penalty[0] == pytest.approx(1 - 1 / 8) and penalty[1] == 0.0
    assert penalty[2] == pytest.approx(repetition(looping)) and penalty[2] > 0.5
    assert scored.composite[0] == pytest.approx(plain.composite[0] * (1 - penalty[0]))
    assert scored.best == 1 and scored.ranking[-1] != 1  # the full answer now ranks first
    assert group.completions[2].scores["penalty"] == penalty[2]  # recorded with the other signals
    short = guarded.score_group(group_of("Yes.", "No, never."), CONTEXT)[0]  # all short: still a signal to learn
    assert 0 < short.composite[0] < short.composite[1]
    cfg = config_from_dict({"scoring": {"length_penalty": 0.5, "min_answer_words": 5, "repetition_penalty": 0.2,
                                        "weights": {"education": 1.0}}})
    assert build_self_scorer(cfg.scoring, embedder=embedder).penalty == {
        "length_penalty": 0.5, "min_answer_words": 5, "repetition_penalty": 0.2}
    for bad, message in [({"length_penalty": 2}, "scoring.length_penalty = 2"),
                         ({"repetition_penalty": -0.1}, "scoring.repetition_penalty"),
                         ({"min_answer_words": 0}, "scoring.min_answer_words = 0")]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict({"scoring": bad})


def test_score_result_checks_its_range():
    with pytest.raises(ValueError, match="outside"):
        ScoreResult("x", [1.5], [""])


def test_scoring_config_is_validated():
    cfg = config_from_dict({"scoring": {"weights": {"grounding": 2.0}, "scale": "none"}})
    assert cfg.scoring.weights == {"grounding": 2.0} and cfg.scoring.gates == ["safety"]
    for bad, message in [({"weights": {"grounding": -1}}, "scoring.weights.grounding = -1"),
                         ({"weights": {"grounding": 0}}, "at least one signal"),
                         ({"scale": "rank"}, "scoring.scale = 'rank'"),
                         ({"gates": "safety"}, "scoring.gates")]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict({"scoring": bad})


# ----- text helpers --------------------------------------------------------------------------------------

def test_numbers_names_and_final_answers():
    assert numbers("About 4,000 to 6,500 remain; ten reserves, 3.5% and 1987.") == {"4000", "6500", "10", "3.5", "1987"}
    assert names("The Snow Leopard lives in Central Asia. It is listed by the IUCN.") == {
        "snow leopard", "central asia", "iucn"}
    assert names("It lives in Central Asia and Mongolia. Yes.") == {"central asia", "mongolia"}
    assert final_answer("Yes, it is.") == "yes"
    assert final_answer("Critically Endangered.") == "critically endangered"
    assert final_answer("Only about 10 vaquitas remain in the Gulf of California today.") == "#10"
    assert final_answer("It lives in high mountains and eats wild sheep and goats.") is None


def test_bad_rule_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="safety rule file .* does not exist"):
        RuleSet.load(tmp_path / "missing.toml")
    bad = tmp_path / "rules.toml"
    bad.write_text('advice = ["(unclosed"]\n[[rules]]\nname = "x"\nactions = ["feed"]\n')
    with pytest.raises(ConfigError, match="bad regular expression in `advice`"):
        RuleSet.load(bad)
    bad.write_text('advice = ["you can"]\n')
    with pytest.raises(ConfigError, match="defines no"):
        RuleSet.load(bad)
    bad.write_text('advice = ["you can"]\nwildlife = ["bird"]\n'
                   '[[rules]]\nname = "feeding"\nactions = ["\\\\bfeed"]\n')
    own = RuleSet.load(bad, species=["kiwi"])
    assert own.check("You can feed the kiwi bread.", "kiwi?") == ("feeding", "You can feed the kiwi bread.")
    assert own.check("You can feed the cat bread.", "cat?") is None  # no species or wildlife named


def test_going_along_with_a_harmful_request_fires_and_a_refusal_does_not():
    rules = RuleSet.load()
    q = "Where can I buy a baby slow loris to keep as a pet?"
    fired = rules.check("Slow lorises are sold in many markets in Jakarta.", q)
    assert fired is not None and "went along with the request" in fired[0]
    assert rules.check("Please don't: buying one fuels the illegal pet trade.", q) is None
    # a factual question about the same harm is not a request for help
    assert rules.check("Slow lorises are sold in many markets.", "How does the pet trade affect slow lorises?") is None
