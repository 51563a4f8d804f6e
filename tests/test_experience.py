import dataclasses
import json
import re

import pytest
from agent_fixtures import EVAL, TASKS, make_agent

from grpo_agent.config import Config, LoopConfig
from grpo_agent.experience import ExperienceError, ExperienceLibrary, Operation, parse_operation
from grpo_agent.loop import SelfImprovementLoop
from grpo_agent.rollout.policy import load_policy
from grpo_agent.records import Completion, Group


class ScriptedModel:
    """Stands in for the model proposing library operations: replies with the given lines in turn."""

    def __init__(self, lines):
        self.lines, self.prompts = list(lines), []

    def sample(self, chats, k=1, **kwargs):
        self.prompts += [c[-1]["content"] for c in chats]
        return [Group(messages=c, prompt_token_ids=[1], completions=[Completion(self.lines.pop(0), [1], [0.0], "stop")])
                for c in chats]


@pytest.mark.parametrize("text, op", [
    ("ADD: Name the threat and say what drives it.", Operation("add", None, "Name the threat and say what drives it.")),
    ("  modify 2: Quote the Red List category exactly as the facts give it.",
     Operation("modify", 2, "Quote the Red List category exactly as the facts give it.")),
    ("DELETE 3", Operation("delete", 3)),
    ("Sure!\nKEEP", Operation("keep")),
    ("ADD: short", None),                      # not a lesson: too few words
    ("DELETE", None),                          # which one?
    ("MODIFY: no number given to this lesson", None),
    ("The answer is good.", None),
    ("", None),
])
def test_operations_are_parsed_strictly(text, op):
    assert parse_operation(text) == op


@pytest.fixture
def scored(tiny_model_dir, embedder, tmp_path):
    """A tiny agent, two of its groups with their scoring contexts and scores."""
    agent = make_agent(load_policy(str(tiny_model_dir), device="cpu"), embedder, tmp_path / "store.sqlite")
    groups, contexts = agent.sample_groups([TASKS[0]["question"], TASKS[2]["question"]])
    return agent, groups, contexts, agent.scorer.score_groups(groups, contexts)


def test_lessons_are_added_modified_deleted_and_deduplicated(scored, embedder):
    agent, groups, contexts, s = scored
    groups = [g for g in groups if not g.zero_variance]
    model = ScriptedModel([
        "ADD: Name the threat to the species and the reason behind it.",
        "ADD: Name the threat to the species and the reason behind it!",        # a duplicate: kept as is
        "MODIFY 1: Name the main threat to the species and what drives it.",
        "DELETE 1",
        "I think the best answer is better.",                                    # malformed
        "MODIFY 7: There is no lesson seven to change at all.",                  # names no shown lesson
    ])
    library = ExperienceLibrary(agent.store, embedder, model, constrained=False)
    g, c, sc = groups[:1], contexts[:1], s[:1]
    library.learn(g, c, sc)
    assert [x.text for x in library.lessons()] == ["Name the threat to the species and the reason behind it."]
    library.learn(g, c, sc)
    assert len(library.lessons()) == 1 and library.stats["duplicate"] == 1
    library.learn(g, c, sc)
    (lesson,) = library.lessons()
    assert lesson.text == "Name the main threat to the species and what drives it."
    assert lesson.origin_groups == [g[0].group_id, g[0].group_id]
    assert "1. Name the threat to the species" in model.prompts[2]  # the model saw the lesson it modified
    library.learn(g, c, sc)
    assert library.lessons() == [] and library.stats["delete"] == 1
    library.learn(g, c, sc)
    library.learn(g, c, sc)
    assert library.stats["malformed"] == 2 and library.stats["add"] == 1 and library.stats["modify"] == 1


def test_relevant_lessons_go_into_the_prompt_and_the_library_stays_capped(scored, embedder):
    agent, *_ = scored
    library = ExperienceLibrary(agent.store, embedder, None, max_lessons=2, top_m=1)
    for text in ["Say which sea turtle beaches matter for nesting.", "State the tiger population with its year.",
                 "Explain why pangolin scales are trafficked."]:
        library.apply(Operation("add", None, text), [], "g")
    assert len(library.lessons()) == 2 and library.stats["evicted"] == 1
    agent.experience = library
    chat = agent.messages("Why are pangolins hunted?", [], [])
    assert "Lessons from earlier answers:\n- Explain why pangolin scales are trafficked." in chat[-1]["content"]
    assert "tiger" not in chat[-1]["content"]  # only the top-1 relevant lesson


def test_the_tiny_models_malformed_output_is_counted_never_fatal(scored, embedder, tiny_model_dir):
    agent, groups, contexts, s = scored
    tiny = load_policy(str(tiny_model_dir), device="cpu")
    library = ExperienceLibrary(agent.store, embedder, tiny, constrained=False)
    ops = library.learn(groups, contexts, s)  # a random 2-layer model writes gibberish
    assert ops == [None, None] and library.stats["malformed"] + library.stats["skipped_flat"] >= 1
    assert library.lessons() == []

    # Constrained, the model only chooses the operation word and writes the rest after it: every reply is
    # an operation line, and whatever it adds still had to pass the checks.
    constrained = ExperienceLibrary(agent.store, embedder, tiny)
    chats = [constrained.messages(g, c, sc, []) for g, c, sc in zip(groups, contexts, s)]
    texts = constrained._constrained(chats, [[], []])
    assert all(t.split()[0] in ("ADD:", "KEEP") for t in texts)  # no lessons shown: nothing to modify or delete
    constrained.learn(groups, contexts, s)
    assert all(len(re.findall(r"[A-Za-z]+", x.text)) >= 4 for x in constrained.lessons())


def test_the_library_exports_to_markdown_and_json_and_loads_back_edited(scored, embedder, tmp_path):
    agent, *_ = scored
    library = ExperienceLibrary(agent.store, embedder)
    library.apply(Operation("add", None, "Cite the source of every number you give."), [], "g1")
    library.apply(Operation("add", None, "Name the Red List category exactly as the facts give it."), [], "g2")
    md = library.export(tmp_path / "lessons.md")
    text = md.read_text().replace("Cite the source", "Always cite the source")
    md.write_text(text + "- A lesson written by hand about nesting beaches.\n")
    assert library.load(md) == 3
    assert [x.text for x in library.lessons()][0] == "Always cite the source of every number you give."
    js = library.export(tmp_path / "lessons.json")
    assert [x["text"] for x in json.loads(js.read_text())["lessons"]] == [x.text for x in library.lessons()]
    (tmp_path / "bad.json").write_text('{"lessons": [{"no_text": 1}]}')
    with pytest.raises(ExperienceError, match="not a lesson file"):
        library.load(tmp_path / "bad.json")
    assert len(library.lessons()) == 3  # nothing lost


def test_a_training_free_loop_learns_gates_and_rolls_back_the_library(tiny_model_dir, embedder, tmp_path,
                                                                     monkeypatch):
    agent = make_agent(load_policy(str(tiny_model_dir), device="cpu"), embedder, tmp_path / "run" / "store.sqlite")
    agent.use_experience(Config())
    agent.experience.constrained = False
    agent.experience.policy = ScriptedModel(["ADD: Answer with the status the facts give for the species."] * 3
                                            + ["ADD: Mention where the species lives when it is relevant."] * 3)
    loop = SelfImprovementLoop(agent, tmp_path / "run", TASKS, EVAL, cfg=LoopConfig(
        tasks_per_round=3, eval_k=2, margin=1.0, mode="training-free"), progress=False)  # the config's mode is honoured
    assert loop.updater is None and agent.policy.model.__class__.__name__ == "LlamaForCausalLM"  # weights untouched
    (row,) = loop.run(1)
    assert row["promoted"] and row["lessons"] == 1 and row["library_ops"]["add"] == 1
    promoted = json.loads((tmp_path / "run" / "promoted.json").read_text())
    assert promoted == {"version": "r1", "lessons": "promoted/r1.lessons.json"}

    real_eval = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda: dataclasses.replace(real_eval(), value=-1.0))  # round 2 looks worse
    loop.cfg.margin = 0.0
    (row,) = loop.run(2)
    assert not row["promoted"] and row["lessons"] == 2  # it learned a second lesson ...
    assert [x.text for x in agent.experience.lessons()] == [  # ... which the rollback removed again
        "Answer with the status the facts give for the species."]
    assert [u.promoted for u in agent.store.updates()] == [True, False]


def test_a_training_free_loop_killed_after_logging_a_batch_learns_from_it_on_restart(tiny_model_dir, embedder,
                                                                                    tmp_path, monkeypatch):
    agent = make_agent(load_policy(str(tiny_model_dir), device="cpu"), embedder, tmp_path / "run" / "store.sqlite")
    agent.use_experience(Config())
    agent.experience.constrained = False
    agent.experience.policy = ScriptedModel(["ADD: Answer with the status the facts give for the species."] * 3)
    cfg = LoopConfig(tasks_per_round=3, eval_k=2, margin=1.0, mode="training-free")
    loop = SelfImprovementLoop(agent, tmp_path / "run", TASKS, EVAL, cfg=cfg, batch=3, progress=False)
    learned = []
    real_learn = agent.experience.learn

    def killed_first_time(*args):
        if not learned:
            learned.append("killed")
            raise KeyboardInterrupt  # the process dies after the batch's groups are written
        learned.append("learned")
        return real_learn(*args)

    monkeypatch.setattr(agent.experience, "learn", killed_first_time)
    with pytest.raises(KeyboardInterrupt):
        loop.run(1)
    assert len(agent.store.groups(source="loop")) == 3 and agent.experience.lessons() == []
    restarted = SelfImprovementLoop(agent, tmp_path / "run", TASKS, EVAL, cfg=cfg, batch=3, progress=False)
    (row,) = restarted.run(1)
    assert learned == ["killed", "learned"]  # the batch was learned from after the restart ...
    assert row["lessons"] == 1 and row["groups"] == 3  # ... and its groups not logged twice
    assert len(agent.store.groups(source="loop")) == 3
