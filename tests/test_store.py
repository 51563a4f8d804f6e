import json
import math
import multiprocessing
import sqlite3
import sys
import time

import pytest

import grpo_agent.store as store_module
from grpo_agent.errors import UnknownGroupError
from grpo_agent.records import Completion, Feedback, Group, GroupInfo, UpdateRecord
from grpo_agent.store import MIGRATIONS, SCHEMA_VERSION, StoreError, TrajectoryStore


def full_group() -> Group:
    """Every field set to something other than its default, with a NaN score and a missing advantage."""
    return Group(
        messages=[{"role": "system", "content": "Answer from the facts."},
                  {"role": "user", "content": "Why are vultures declining in South Asia? (diclofenac, 95 %)"}],
        prompt_token_ids=[1, 17, 204, 9],
        completions=[
            Completion("Diclofenac in cattle carcasses.", [5, 6, 2], [-0.25, -1.5e-07, -3.0], "stop",
                       {"grounding": 0.9, "consistency": float("nan")}, 0.9, 0.71),
            Completion("Poaching.", [7, 8], [-2.0, -0.5], "length", {"grounding": 0.1, "consistency": 0.2}, 0.15, None),
            Completion("", [], [], "length"),
        ],
        policy_version="round-3",
        temperature=0.7,
        zero_variance=True,
        group_id="vultures-1",
    )


def small_group(group_id: str, policy_version: str = "base", n: int = 2) -> Group:
    return Group(
        messages=[{"role": "user", "content": group_id}],
        prompt_token_ids=[1, 2],
        completions=[Completion(f"{group_id}/{k}", [10 + k, 20 + k], [-0.5, -0.25], "stop") for k in range(n)],
        policy_version=policy_version,
        group_id=group_id,
    )


def test_a_logged_group_reads_back_equal(tmp_path):
    group = full_group()
    with TrajectoryStore(tmp_path / "runs" / "store.db") as store:
        assert store.log_group(group, prompt="Why vultures?", passage_ids=["p1", "p7"], config_hash="abc123",
                               task_id="t-9", source="eval", meta={"seed": 3}) == "vultures-1"
    with TrajectoryStore(tmp_path / "runs" / "store.db") as store:  # reopened: it is on disk
        loaded = store.get_group("vultures-1")
        info = store.group_info("vultures-1")
    assert repr(loaded) == repr(group)  # repr, because NaN != NaN defeats ==
    assert math.isnan(loaded.completions[0].scores["consistency"])
    assert loaded.completions[1].advantage is None and loaded.completions[2].composite is None
    assert loaded.completions[1].finish_reason == "length"
    assert info.created == pytest.approx(time.time(), abs=60) and loaded.info == info
    assert info == GroupInfo(prompt="Why vultures?", passage_ids=["p1", "p7"], config_hash="abc123", task_id="t-9",
                             source="eval", meta={"seed": 3}, created=info.created)


def test_unknown_group_raises(tmp_path):
    with TrajectoryStore(tmp_path / "s.db") as store:
        with pytest.raises(UnknownGroupError, match="no group 'nope'"):
            store.get_group("nope")
        with pytest.raises(UnknownGroupError, match="no group 'nope'"):
            store.group_info("nope")
        with pytest.raises(UnknownGroupError, match="no group 'nope'"):
            store.add_feedback("nope", 0.5)


def test_feedback_reads_back_per_group_and_rescored_advantages_are_written_back(tmp_path):
    with TrajectoryStore(tmp_path / "s.db") as store:
        for gid in ("a", "b", "c"):
            store.log_group(small_group(gid), prompt=gid)
        store.add_feedback("a", 0.25, text="meh")
        store.add_feedback("c", 1.0, index=1)
        store.add_feedback("a", 0.75)
        ratings = store.feedback_for(["a", "b", "c"])
        assert sorted(ratings) == ["a", "c"]  # b was not rated
        assert [(f.index, f.rating, f.text) for f in ratings["a"]] == [(None, 0.25, "meh"), (None, 0.75, "")]
        assert ratings["c"] == store.feedback("c") and isinstance(ratings["c"][0], Feedback)
        assert store.feedback("b") == []

        groups = store.groups(ids=["a", "b"])
        for g in groups:
            g.zero_variance = g.group_id == "b"
            for i, c in enumerate(g.completions):
                c.composite, c.advantage = 0.1 * i, (0.0 if g.zero_variance else 1.0 - 2 * i)
        store.record_scores(groups)
        again = {g.group_id: g for g in store.groups()}
        assert [c.advantage for c in again["a"].completions] == [1.0, -1.0] and not again["a"].zero_variance
        assert again["b"].zero_variance and [c.composite for c in again["b"].completions] == [0.0, 0.1]
        assert again["c"] == store.get_group("c")  # untouched
        before = [c.advantage for c in again["c"].completions]
        for c in again["c"].completions:
            c.advantage = 0.5
        with pytest.raises(UnknownGroupError):  # a group not in the store: nothing is written, c included
            store.record_scores([again["c"], small_group("ghost")])
        assert [c.advantage for c in store.get_group("c").completions] == before


def test_unstorable_values_raise_naming_the_field(tmp_path):
    group = small_group("g")
    group.completions[1].token_ids = [1, object()]
    with TrajectoryStore(tmp_path / "s.db") as store:
        with pytest.raises(StoreError, match="completion 1 token_ids cannot be stored as JSON"):
            store.log_group(group, prompt="q")
        assert store.count_groups() == 0


def test_a_failed_write_leaves_no_part_of_the_group(tmp_path):
    group = small_group("g")
    group.completions[1].finish_reason = None  # fails on the second completion row, after the group row
    with TrajectoryStore(tmp_path / "s.db") as store:
        with pytest.raises(StoreError, match="completions.finish_reason"):
            store.log_group(group, prompt="q")
        assert store.count_groups() == 0
        group.completions[1].finish_reason = "stop"
        store.log_group(group, prompt="q")
        assert len(store.get_group("g").completions) == 2


def test_filters_and_order(tmp_path):
    with TrajectoryStore(tmp_path / "s.db") as store:
        for gid, version in [("z", "base"), ("y", "base"), ("x", "r1"), ("w", "r1")]:  # ids sort against log order
            store.log_group(small_group(gid, version), prompt=gid, source="eval" if gid == "x" else "agent")
        assert [g.group_id for g in store.groups()] == ["z", "y", "x", "w"]
        assert [g.group_id for g in store.groups(ids=["w", "z"])] == ["z", "w"]
        assert [g.group_id for g in store.groups(limit=2)] == ["z", "y"]
        assert [g.group_id for g in store.groups(policy_version="r1")] == ["x", "w"]
        assert [g.group_id for g in store.groups(source="eval")] == ["x"]
        assert store.groups(since=time.time() + 60) == []

        update_id = store.record_update(round=1, policy_version="r1", group_ids=["y", "x"], metrics={"loss": 0.5},
                                        promoted=True, reason="eval improved", checkpoint="ckpt/r1")
        assert store.consumed_group_ids() == {"y", "x"}
        assert [g.group_id for g in store.groups(unconsumed=True)] == ["z", "w"]
        assert [g.group_id for g in store.groups(unconsumed=True, policy_version="r1")] == ["w"]
        assert store.count_groups() == 4
        assert store.count_groups(unconsumed=True) == 2
        assert store.count_groups(limit=3) == 3

        (update,) = store.updates()
        assert update.created == pytest.approx(time.time(), abs=60)
        assert update == UpdateRecord(id=update_id, created=update.created, round=1, policy_version="r1",
                                      group_ids=["y", "x"], metrics={"loss": 0.5}, eval=None, promoted=True,
                                      reason="eval improved", checkpoint="ckpt/r1")


def test_bad_filters_and_updates_raise(tmp_path):
    with TrajectoryStore(tmp_path / "s.db") as store:
        store.log_group(small_group("a"), prompt="a")
        with pytest.raises(StoreError, match="one string"):
            store.groups(ids="a")
        with pytest.raises(StoreError, match="limit=-1"):
            store.groups(limit=-1)
        with pytest.raises(StoreError, match=r"not in .*'ghost'"):
            store.record_update(round=1, policy_version="r1", group_ids=["a", "ghost"], metrics={}, promoted=False)
        with pytest.raises(StoreError, match="repeats"):
            store.record_update(round=1, policy_version="r1", group_ids=["a", "a"], metrics={}, promoted=False)
        assert store.updates() == [] and store.consumed_group_ids() == set()


def test_a_group_is_logged_once(tmp_path):
    with TrajectoryStore(tmp_path / "s.db") as store:
        store.log_group(small_group("g1"), prompt="first")
        with pytest.raises(StoreError, match="group 'g1' is already in"):
            store.log_group(small_group("g1", n=3), prompt="second")
        assert store.count_groups() == 1
        assert store.group_info("g1").prompt == "first"
        assert len(store.get_group("g1").completions) == 2
        store.log_group(small_group("g2"), prompt="next")  # the failed write left no transaction open
        assert store.count_groups() == 2


def test_steps_append(tmp_path):
    with TrajectoryStore(tmp_path / "s.db") as store:
        store.log_group(small_group("g"), prompt="q")
        assert store.steps("g") == []
        store.attach_steps("g", [{"type": "tool", "name": "search", "input": "vultures"}])
        store.attach_steps("g", [{"type": "message", "content": "found 3 facts"}, {"type": "final"}])
        with pytest.raises(StoreError, match="no group 'other'"):
            store.attach_steps("other", [{"type": "final"}])
        with pytest.raises(StoreError, match="each step is a dict"):
            store.attach_steps("g", ["not a dict"])
    with TrajectoryStore(tmp_path / "s.db") as store:
        assert store.steps("g") == [{"type": "tool", "name": "search", "input": "vultures"},
                                    {"type": "message", "content": "found 3 facts"}, {"type": "final"}]


def test_a_held_lock_ends_in_a_store_error(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_S", 0.05)
    monkeypatch.setattr(store_module, "RETRY_PAUSE_S", 0.0)
    store = TrajectoryStore(tmp_path / "s.db")
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process mid-write
    with pytest.raises(StoreError, match="stayed locked"):
        store.log_group(small_group("g"), prompt="q")
    other.execute("COMMIT")
    store.log_group(small_group("g"), prompt="q")
    assert store.count_groups() == 1
    other.close()
    store.close()


# ----- several processes ------------------------------------------------------------------------------

WORKERS, GROUPS_EACH = 4, 200


def write_groups(path: str, worker: int) -> None:
    """Run in a child process: log GROUPS_EACH groups through its own store."""
    with TrajectoryStore(path) as store:
        for i in range(GROUPS_EACH):
            store.log_group(small_group(f"w{worker}-{i}"), prompt=f"question {i}", source=f"worker-{worker}")


def test_processes_write_one_store_at_once(tmp_path):
    path = str(tmp_path / "shared.db")
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=write_groups, args=(path, w)) for w in range(WORKERS)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=120)
    for p in workers:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in workers] == [0] * WORKERS

    with TrajectoryStore(path) as store:
        groups = store.groups()
        assert store.count_groups(source="worker-2") == GROUPS_EACH
    assert len({g.group_id for g in groups}) == len(groups) == WORKERS * GROUPS_EACH
    for g in groups:
        assert [(c.text, c.token_ids, c.logprobs) for c in g.completions] == [
            (f"{g.group_id}/0", [10, 20], [-0.5, -0.25]), (f"{g.group_id}/1", [11, 21], [-0.5, -0.25])
        ]
    for w in range(WORKERS):  # each worker's groups in its own logging order
        mine = [g.group_id for g in groups if g.group_id.startswith(f"w{w}-")]
        assert mine == [f"w{w}-{i}" for i in range(GROUPS_EACH)]


# ----- schema versions and foreign files --------------------------------------------------------------

def test_a_version_1_store_is_migrated_with_its_data(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    with conn:  # a store as the first release wrote it, built from the version-1 statements only
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        conn.execute("INSERT INTO groups VALUES ('old', 1.0, 'base', 1.0, 0, ?, '[1,2]', 'q', '[]', '', NULL, "
                     "'agent', '{}')", (json.dumps([{"role": "user", "content": "q"}]),))
        conn.execute("INSERT INTO completions VALUES ('old', 0, 'an answer', '[3,4]', '[-0.5,-0.25]', 'stop', "
                     "'{\"grounding\":0.5}', 0.5, 0.0)")
    conn.close()
    assert SCHEMA_VERSION == 5

    with TrajectoryStore(path) as store:
        assert store.get_group("old") == Group(
            [{"role": "user", "content": "q"}], [1, 2],
            [Completion("an answer", [3, 4], [-0.5, -0.25], "stop", {"grounding": 0.5}, 0.5, 0.0)],
            group_id="old",
        )
        store.attach_steps("old", [{"type": "final"}])  # the steps table came with version 2
        assert store.steps("old") == [{"type": "final"}]
        store.put_lesson("l1", "Cite the fact.", ["old"])  # the lessons table with version 3
        assert [x.text for x in store.lessons()] == ["Cite the fact."]
        # version 5: an episode's mask and turns beside the old completion, which reads back without them
        episode = Completion("final", [5, 6, 7], [-0.1, 0.0, -0.2], "stop", mask=[1, 0, 1],
                             turns=[{"role": "assistant", "content": "Search: x"}])
        store.log_group(Group([{"role": "user", "content": "q2"}], [1], [episode], group_id="new"), prompt="q2")
        assert store.get_group("new").completions == [episode]
        assert store.get_group("old").completions[0].mask is None
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("5",)
    conn.close()


def test_a_store_from_a_newer_release_is_refused(tmp_path):
    path = tmp_path / "new.db"
    TrajectoryStore(path).close()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    conn.close()
    with pytest.raises(StoreError, match="newer than this grpo-agent.*upgrade grpo-agent"):
        TrajectoryStore(path)


def test_a_file_that_is_not_sqlite_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "notes.db"
    content = b"these are my notes, not a database\n" * 20
    path.write_bytes(content)
    with pytest.raises(StoreError, match=f"{path} is not a SQLite database"):
        TrajectoryStore(path)
    assert path.read_bytes() == content


def test_another_programs_sqlite_file_is_refused(tmp_path):
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE groups (name TEXT)")
    conn.close()
    with pytest.raises(StoreError, match="not a grpo-agent trajectory store"):
        TrajectoryStore(path)


# ----- export -----------------------------------------------------------------------------------------

def test_export_jsonl(tmp_path):
    with TrajectoryStore(tmp_path / "s.db") as store:
        store.log_group(full_group(), prompt="Why vultures?", passage_ids=["p1"], meta={"seed": 3})
        store.log_group(small_group("later", "r1"), prompt="q")
        assert store.export_jsonl(tmp_path / "out" / "all.jsonl") == 2
        assert store.export_jsonl(tmp_path / "out" / "r1.jsonl", policy_version="r1") == 1
        with pytest.raises(StoreError, match="unknown filter"):
            store.export_jsonl(tmp_path / "out" / "x.jsonl", version="r1")
    lines = (tmp_path / "out" / "all.jsonl").read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0], parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert first["group_id"] == "vultures-1" and first["prompt"] == "Why vultures?" and first["meta"] == {"seed": 3}
    assert first["completions"][0]["scores"] == {"grounding": 0.9, "consistency": None}  # NaN -> null
    assert first["completions"][0]["token_ids"] == [5, 6, 2] and first["temperature"] == 0.7
    assert [json.loads(line)["group_id"] for line in (tmp_path / "out" / "r1.jsonl").read_text().splitlines()] == [
        "later"
    ]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["all.jsonl", "r1.jsonl"]  # no temporary left


def test_export_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    with TrajectoryStore(tmp_path / "s.db") as store:
        store.log_group(full_group(), prompt="Why vultures?", passage_ids=["p1", "p7"], task_id="t-9")
        store.log_group(small_group("later"), prompt="q")
        assert store.export_parquet(tmp_path / "all.parquet") == 2
    rows = pq.read_table(tmp_path / "all.parquet").to_pylist()
    assert [(r["group_id"], r["idx"]) for r in rows] == [("vultures-1", 0), ("vultures-1", 1), ("vultures-1", 2),
                                                         ("later", 0), ("later", 1)]
    first = rows[0]
    assert first["token_ids"] == [5, 6, 2] and first["logprobs"] == [-0.25, -1.5e-07, -3.0]
    assert first["passage_ids"] == ["p1", "p7"] and first["task_id"] == "t-9" and first["zero_variance"] is True
    scores = dict(first["scores"])
    assert scores["grounding"] == 0.9 and math.isnan(scores["consistency"])
    assert rows[1]["advantage"] is None and rows[3]["task_id"] is None
    assert json.loads(first["messages"])[1]["content"].startswith("Why are vultures")


def test_export_parquet_without_pyarrow_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now raises ImportError
    with TrajectoryStore(tmp_path / "s.db") as store:
        with pytest.raises(StoreError, match="pip install pyarrow"):
            store.export_parquet(tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()


def test_one_store_is_shared_safely_between_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    store = TrajectoryStore(tmp_path / "t.sqlite")

    def log(i):
        g = Group(messages=[], prompt_token_ids=[1], completions=[Completion(f"a{i}", [2], [-0.1], "stop")])
        return store.log_group(g, prompt=f"q{i}")

    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(log, range(40)))
    assert store.count_groups() == 40 and {g.group_id for g in store.groups()} == set(ids)
    store.close()


def test_lessons_are_added_replaced_deleted_and_restored(tmp_path):
    with TrajectoryStore(tmp_path / "s.sqlite") as store:
        store.put_lesson("a", "Name the threat.", ["g1"])
        store.put_lesson("b", "Cite the source.", ["g2"])
        snapshot = store.lessons()
        store.put_lesson("a", "Name the main threat and its cause.", ["g1", "g3"])
        store.delete_lesson("b")
        assert [(x.lesson_id, x.text, x.origin_groups) for x in store.lessons()] == [
            ("a", "Name the main threat and its cause.", ["g1", "g3"])]
        store.replace_lessons(snapshot)
        assert store.lessons() == snapshot
