"""SQLite trajectory store: sampled groups with their completions and scores, agent-run steps and updates.

One file, written by several processes at once: WAL mode lets readers run beside a writer, `busy_timeout`
makes a writer wait for the lock, and every write is one `BEGIN IMMEDIATE` transaction, tried again a few
times if the lock is still taken. Lists and dicts are JSON text (never pickle), written by Python's json,
which keeps NaN and +-Infinity: a NaN score reads back as NaN. SQLite stores a NaN REAL as NULL, so a NaN
composite or advantage would read back as None (the scorer never writes one). `export_jsonl` writes
strict JSON instead, with null for every non-finite float, so any JSON reader accepts the file.

The schema is MIGRATIONS: entry v-1 holds the SQL statements that bring a store to version v. Opening a
store at version v runs versions v+1..latest, each in one transaction, and records the version in `meta`.
A store written by a newer grpo-agent is refused rather than guessed at.

Reads return typed records (records.py: Group with its GroupInfo, Feedback, UpdateRecord, Lesson), never dicts.
This module is longer than most (~600 lines) on purpose: it is the only code that speaks SQL, so the schema,
the writes and the queries that depend on it are read and changed together.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from .errors import StoreError, UnknownGroupError
from .records import Completion, Feedback, Group, GroupInfo, Lesson, UpdateRecord
from .rundir import replacing

T = TypeVar("T")

BUSY_TIMEOUT_S = 30.0  # how long SQLite waits for another writer's lock before reporting "database is locked"
LOCK_ATTEMPTS = 5  # tries of a write that keeps finding the database locked, each after a full busy timeout
RETRY_PAUSE_S = 0.1  # pause before the n-th retry: n * RETRY_PAUSE_S

MIGRATIONS: list[tuple[str, ...]] = [
    (  # 1: groups, their completions, updates and the groups each update consumed
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE groups (
            group_id TEXT PRIMARY KEY,
            created REAL NOT NULL,           -- time.time() when logged
            policy_version TEXT NOT NULL,
            temperature REAL NOT NULL,
            zero_variance INTEGER NOT NULL,  -- 0 or 1
            messages TEXT NOT NULL,          -- JSON list of chat messages
            prompt_token_ids TEXT NOT NULL,  -- JSON list of ints
            prompt TEXT NOT NULL,
            passage_ids TEXT NOT NULL,       -- JSON list of strings
            config_hash TEXT NOT NULL,
            task_id TEXT,
            source TEXT NOT NULL,
            meta TEXT NOT NULL               -- JSON object
        )""",
        """CREATE TABLE completions (
            group_id TEXT NOT NULL REFERENCES groups (group_id),
            idx INTEGER NOT NULL,            -- position in the group
            text TEXT NOT NULL,
            token_ids TEXT NOT NULL,         -- JSON list of ints
            logprobs TEXT NOT NULL,          -- JSON list of floats
            finish_reason TEXT NOT NULL,
            scores TEXT NOT NULL,            -- JSON object: signal name -> score
            composite REAL,
            advantage REAL,
            PRIMARY KEY (group_id, idx)
        )""",
        """CREATE TABLE updates (
            id INTEGER PRIMARY KEY,
            created REAL NOT NULL,
            round INTEGER NOT NULL,
            policy_version TEXT NOT NULL,
            metrics TEXT NOT NULL,           -- JSON object
            eval TEXT,                       -- JSON object or NULL
            promoted INTEGER NOT NULL,       -- 0 or 1
            reason TEXT NOT NULL,
            checkpoint TEXT NOT NULL
        )""",
        """CREATE TABLE update_groups (
            update_id INTEGER NOT NULL REFERENCES updates (id),
            group_id TEXT NOT NULL REFERENCES groups (group_id),
            PRIMARY KEY (update_id, group_id)
        )""",
    ),
    (  # 2: agent-run steps (tool calls, intermediate messages); indexes for the filters
        """CREATE TABLE steps (
            id INTEGER PRIMARY KEY,
            group_id TEXT NOT NULL REFERENCES groups (group_id),
            step TEXT NOT NULL               -- JSON object
        )""",
        "CREATE INDEX steps_by_group ON steps (group_id, id)",
        "CREATE INDEX groups_by_created ON groups (created)",
        "CREATE INDEX update_groups_by_group ON update_groups (group_id)",
    ),
    (  # 3: the training-free mode's experience library
        """CREATE TABLE lessons (
            lesson_id TEXT PRIMARY KEY,
            text TEXT NOT NULL,
            origin_groups TEXT NOT NULL,     -- JSON list of the group ids it was learned or revised from
            created REAL NOT NULL,
            updated REAL NOT NULL
        )""",
    ),
    (  # 4: outcomes reported by clients (POST /v1/feedback): a rating of a group or one of its completions
        """CREATE TABLE feedback (
            id INTEGER PRIMARY KEY,
            group_id TEXT NOT NULL REFERENCES groups (group_id),
            idx INTEGER,                     -- the completion rated; NULL: the answer served
            rating REAL NOT NULL,            -- in [0, 1]
            text TEXT NOT NULL,
            created REAL NOT NULL
        )""",
        "CREATE INDEX feedback_by_group ON feedback (group_id, id)",
    ),
    (  # 5: multi-turn episodes (episodes.py): which token ids the policy sampled, and the turns as text
        "ALTER TABLE completions ADD COLUMN mask TEXT",   # JSON list of 0/1 or NULL (all sampled)
        "ALTER TABLE completions ADD COLUMN turns TEXT",  # JSON list of turn objects or NULL (a single answer)
    ),
]
SCHEMA_VERSION = len(MIGRATIONS)



class TrajectoryStore:
    """Groups, steps and updates in one SQLite file that several processes may write at once.

    Safe to share between threads (a server's, LangChain's batch): each thread gets its own connection.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        try:
            version = self._version()  # the first read: fails, writing nothing, on a file that is not SQLite
        except sqlite3.DatabaseError as e:
            self.close()
            raise StoreError(
                f"{self.path} is not a SQLite database ({e}); point the store at a new file or an existing store"
            ) from e
        except StoreError:
            self.close()
            raise
        self._retrying(lambda: self._conn.execute("PRAGMA journal_mode = WAL"))
        self._migrate(version)

    @property
    def _conn(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:  # autocommit: transactions are explicit; used by this thread only, closed by any
                conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            except sqlite3.Error as e:
                raise StoreError(f"cannot open the trajectory store {self.path}: {e}; give a writable file path") from e
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            conn.execute("PRAGMA synchronous = NORMAL")  # with WAL: safe against crashes, fsync per checkpoint
            conn.execute("PRAGMA foreign_keys = ON")
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    def close(self) -> None:
        """Close every thread's connection."""
        with self._all_lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()

    def __enter__(self) -> TrajectoryStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- writing ---------------------------------------------------------------------------------------

    def log_group(
        self, group: Group, *, prompt: str, passage_ids: Sequence[str] = (), config_hash: str = "",
        task_id: str | None = None, source: str = "agent", meta: dict | None = None,
    ) -> str:
        """Record `group` and all its completions in one transaction; returns its group_id."""
        gid = group.group_id
        group_row = (
            gid, time.time(), group.policy_version, float(group.temperature), int(bool(group.zero_variance)),
            _dumps(group.messages, "messages"), _dumps(group.prompt_token_ids, "prompt_token_ids"), prompt,
            _dumps(list(passage_ids), "passage_ids"), config_hash, task_id, source, _dumps(meta or {}, "meta"),
        )
        completion_rows = [
            (gid, i, c.text, _dumps(c.token_ids, f"completion {i} token_ids"),
             _dumps(c.logprobs, f"completion {i} logprobs"), c.finish_reason,
             _dumps(c.scores, f"completion {i} scores"), _real(c.composite), _real(c.advantage),
             None if c.mask is None else _dumps(c.mask, f"completion {i} mask"),
             None if c.turns is None else _dumps(c.turns, f"completion {i} turns"))
            for i, c in enumerate(group.completions)
        ]
        for i, c in enumerate(group.completions):
            if c.mask is not None and len(c.mask) != len(c.token_ids):
                raise StoreError(f"group {gid} completion {i}: {len(c.token_ids)} token ids but a mask of "
                                 f"{len(c.mask)}; give one 0/1 per token id")

        def write(conn: sqlite3.Connection) -> None:
            if _group_exists(conn, gid):
                raise StoreError(
                    f"group {gid!r} is already in {self.path}; a group is logged once (give a new group its own "
                    "group_id)"
                )
            conn.execute("INSERT INTO groups VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", group_row)
            conn.executemany("INSERT INTO completions (group_id, idx, text, token_ids, logprobs, finish_reason, scores, "
                             "composite, advantage, mask, turns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             completion_rows)

        self._transaction(write)
        return gid

    def attach_steps(self, group_id: str, steps: list[dict]) -> None:
        """Append agent-run steps (tool calls, intermediate messages) to those already attached to a group."""
        for i, step in enumerate(steps):
            if not isinstance(step, dict):
                raise StoreError(f"step {i} of group {group_id!r} is a {type(step).__name__}; each step is a dict")
        rows = [(group_id, _dumps(step, f"step {i}")) for i, step in enumerate(steps)]

        def write(conn: sqlite3.Connection) -> None:
            self._require_group(conn, group_id)
            conn.executemany("INSERT INTO steps (group_id, step) VALUES (?, ?)", rows)

        self._transaction(write)

    def record_update(
        self, *, round: int, policy_version: str, group_ids: Sequence[str], metrics: dict,
        eval: dict | None = None, promoted: bool, reason: str = "", checkpoint: str = "",
    ) -> int:
        """Record one policy update and the groups it trained on (they count as consumed); returns its id."""
        ids = _id_list(group_ids, "group_ids")
        repeated = sorted(g for g, n in Counter(ids).items() if n > 1)
        if repeated:
            raise StoreError(f"group_ids repeats {repeated[:5]}; list each group an update consumed once")
        row = (time.time(), int(round), policy_version, _dumps(metrics, "metrics"),
               None if eval is None else _dumps(eval, "eval"), int(bool(promoted)), reason, checkpoint)

        def write(conn: sqlite3.Connection) -> int:
            missing = [r[0] for r in conn.execute(
                "SELECT value FROM json_each(?) WHERE value NOT IN (SELECT group_id FROM groups)", (json.dumps(ids),)
            )]
            if missing:
                raise StoreError(
                    f"update consumes {len(missing)} group(s) not in {self.path}, e.g. {missing[:3]}; log the "
                    "groups before recording the update that trains on them"
                )
            update_id = conn.execute(
                "INSERT INTO updates (created, round, policy_version, metrics, eval, promoted, reason, checkpoint) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row,
            ).lastrowid
            conn.executemany("INSERT INTO update_groups VALUES (?, ?)", [(update_id, g) for g in ids])
            return update_id

        return self._transaction(write)

    def add_feedback(self, group_id: str, rating: float, index: int | None = None, text: str = "") -> int:
        """Record a client's rating in [0, 1] of a group's completion (index None: the one served)."""
        if not isinstance(rating, (int, float)) or not 0.0 <= rating <= 1.0:
            raise StoreError(f"rating {rating!r}: a rating is a number in [0, 1]")

        def write(conn: sqlite3.Connection) -> int:
            self._require_group(conn, group_id)
            if index is not None:
                k = conn.execute("SELECT count(*) FROM completions WHERE group_id = ?", (group_id,)).fetchone()[0]
                if not 0 <= index < k:
                    raise StoreError(f"group {group_id!r} has {k} completions; completion_index {index} is not one")
            return conn.execute("INSERT INTO feedback (group_id, idx, rating, text, created) VALUES (?, ?, ?, ?, ?)",
                                (group_id, index, float(rating), text, time.time())).lastrowid

        return self._transaction(write)

    def feedback(self, group_id: str) -> list[Feedback]:
        """The ratings reported for a group, oldest first."""
        return self.feedback_for([group_id]).get(group_id, [])

    def feedback_for(self, group_ids: Sequence[str]) -> dict[str, list[Feedback]]:
        """The ratings reported for each of these groups (one query), oldest first; unrated groups are absent."""
        rows = self._conn.execute(
            "SELECT group_id, idx, rating, text, created FROM feedback WHERE group_id IN (SELECT value FROM "
            "json_each(?)) ORDER BY id", (json.dumps(_id_list(group_ids, "group_ids")),))
        found: dict[str, list[Feedback]] = {}
        for r in rows:
            found.setdefault(r["group_id"], []).append(Feedback(r["idx"], r["rating"], r["text"], r["created"]))
        return found

    def record_scores(self, groups: Sequence[Group]) -> None:
        """Write back logged groups' composites, advantages and zero-variance flags (after re-scoring, e.g. with
        clients' ratings), so the store keeps what an update trains on; one transaction."""
        completion_rows = [(_real(c.composite), _real(c.advantage), g.group_id, i)
                           for g in groups for i, c in enumerate(g.completions)]
        group_rows = [(int(bool(g.zero_variance)), g.group_id) for g in groups]

        def write(conn: sqlite3.Connection) -> None:
            for g in groups:
                self._require_group(conn, g.group_id)
            conn.executemany("UPDATE completions SET composite = ?, advantage = ? WHERE group_id = ? AND idx = ?",
                             completion_rows)
            conn.executemany("UPDATE groups SET zero_variance = ? WHERE group_id = ?", group_rows)

        self._transaction(write)

    def put_lesson(self, lesson_id: str, text: str, origin_groups: Sequence[str]) -> None:
        """Add a lesson, or replace the text and origins of the one with this id."""
        now = time.time()

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO lessons VALUES (?, ?, ?, ?, ?) ON CONFLICT (lesson_id) DO UPDATE SET "
                "text = excluded.text, origin_groups = excluded.origin_groups, updated = excluded.updated",
                (lesson_id, text, _dumps(list(origin_groups), "origin_groups"), now, now))

        self._transaction(write)

    def delete_lesson(self, lesson_id: str) -> None:
        """Remove a lesson (no error when it is already gone)."""
        self._transaction(lambda conn: conn.execute("DELETE FROM lessons WHERE lesson_id = ?", (lesson_id,)))

    def lessons(self) -> list[Lesson]:
        """Every lesson, oldest first."""
        rows = self._conn.execute("SELECT * FROM lessons ORDER BY created, lesson_id").fetchall()
        return [Lesson(r["lesson_id"], r["text"], json.loads(r["origin_groups"]), r["created"], r["updated"])
                for r in rows]

    def replace_lessons(self, lessons: Sequence[Lesson]) -> None:
        """Make the library exactly `lessons`, in one transaction. A lesson without times gets now, a microsecond
        apart in the given order, which `lessons()` keeps."""
        now = time.time()
        rows = [(x.lesson_id, x.text, _dumps(list(x.origin_groups), "origin_groups"),
                 float(x.created or now + i * 1e-6), float(x.updated or now + i * 1e-6)) for i, x in enumerate(lessons)]

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM lessons")
            conn.executemany("INSERT INTO lessons VALUES (?, ?, ?, ?, ?)", rows)

        self._transaction(write)

    # ----- reading ---------------------------------------------------------------------------------------

    def get_group(self, group_id: str) -> Group:
        """The logged group, exactly as it was logged, with its info."""
        found = self._select([group_id], None, None, False, None, None)
        if not found:
            raise UnknownGroupError(f"no group {group_id!r} in {self.path}; ids come from log_group or groups()")
        return found[0]

    def group_info(self, group_id: str) -> GroupInfo:
        """What was logged beside a group: prompt, passage_ids, config_hash, task_id, source, meta, created."""
        return self.get_group(group_id).info

    def groups(
        self, *, ids: Sequence[str] | None = None, since: float | None = None, policy_version: str | None = None,
        unconsumed: bool = False, source: str | None = None, limit: int | None = None,
    ) -> list[Group]:
        """The groups matching every given filter, in logging order, each with its info; `unconsumed`: no update
        trained on them."""
        return self._select(ids, since, policy_version, unconsumed, source, limit)

    def count_groups(
        self, *, ids: Sequence[str] | None = None, since: float | None = None, policy_version: str | None = None,
        unconsumed: bool = False, source: str | None = None, limit: int | None = None,
    ) -> int:
        """How many groups `groups()` would return with the same filters."""
        where, params = _where(ids, since, policy_version, unconsumed, source)
        sql = f"SELECT count(*) FROM (SELECT 1 FROM groups{where}{_limit(limit, params)})"
        return self._conn.execute(sql, params).fetchone()[0]

    def logged(self, group_ids: Sequence[str]) -> set[str]:
        """Those of `group_ids` already in the store."""
        ids = list(group_ids)
        found: set[str] = set()
        for start in range(0, len(ids), 500):  # SQLite caps the parameters of one statement
            part = ids[start : start + 500]
            sql = f"SELECT group_id FROM groups WHERE group_id IN ({', '.join('?' * len(part))})"
            found.update(row[0] for row in self._conn.execute(sql, part))
        return found

    def steps(self, group_id: str) -> list[dict]:
        """The steps attached to a group, in the order they were attached."""
        self._require_group(self._conn, group_id)
        rows = self._conn.execute("SELECT step FROM steps WHERE group_id = ? ORDER BY id", (group_id,))
        return [json.loads(r["step"]) for r in rows]

    def updates(self) -> list[UpdateRecord]:
        """Every recorded update, oldest first, with the ids of the groups it consumed."""
        consumed: dict[int, list[str]] = {}
        for r in self._conn.execute("SELECT update_id, group_id FROM update_groups ORDER BY rowid"):
            consumed.setdefault(r["update_id"], []).append(r["group_id"])
        return [
            UpdateRecord(
                id=r["id"], created=r["created"], round=r["round"], policy_version=r["policy_version"],
                group_ids=consumed.get(r["id"], []), metrics=json.loads(r["metrics"]),
                eval=None if r["eval"] is None else json.loads(r["eval"]), promoted=bool(r["promoted"]),
                reason=r["reason"], checkpoint=r["checkpoint"],
            )
            for r in self._conn.execute("SELECT * FROM updates ORDER BY id")
        ]

    def consumed_group_ids(self) -> set[str]:
        """Ids of the groups some recorded update trained on."""
        return {r[0] for r in self._conn.execute("SELECT DISTINCT group_id FROM update_groups")}

    # ----- export ----------------------------------------------------------------------------------------

    def export_jsonl(self, path: str | os.PathLike, **filters) -> int:
        """Write the matching groups as JSON lines, one group with its info and completions a line; returns how
        many. Takes the filters of `groups()`; NaN and infinite floats are written as null."""
        selected = self._select(**_filter_args(filters))
        with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for group in selected:
                record = _finite({**{k: v for k, v in asdict(group).items() if k != "info"}, **asdict(group.info)})
                f.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
        return len(selected)

    def export_parquet(self, path: str | os.PathLike, **filters) -> int:
        """Write one Parquet row per completion of the matching groups (group columns repeated); returns the
        number of groups. Takes the filters of `groups()`; scores are a map column, messages and meta JSON."""
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as e:
            raise StoreError("export_parquet needs pyarrow; install it with `pip install pyarrow`") from e
        schema = pa.schema([
            ("group_id", pa.string()), ("idx", pa.int64()), ("created", pa.float64()),
            ("policy_version", pa.string()), ("temperature", pa.float64()), ("zero_variance", pa.bool_()),
            ("prompt", pa.string()), ("passage_ids", pa.list_(pa.string())), ("config_hash", pa.string()),
            ("task_id", pa.string()), ("source", pa.string()), ("meta", pa.string()), ("messages", pa.string()),
            ("prompt_token_ids", pa.list_(pa.int64())), ("text", pa.string()), ("token_ids", pa.list_(pa.int64())),
            ("logprobs", pa.list_(pa.float64())), ("finish_reason", pa.string()),
            ("scores", pa.map_(pa.string(), pa.float64())), ("composite", pa.float64()), ("advantage", pa.float64()),
        ])
        selected = self._select(**_filter_args(filters))
        rows = [
            {
                "group_id": g.group_id, "idx": i, "created": g.info.created, "policy_version": g.policy_version,
                "temperature": g.temperature, "zero_variance": g.zero_variance, "prompt": g.info.prompt,
                "passage_ids": g.info.passage_ids, "config_hash": g.info.config_hash, "task_id": g.info.task_id,
                "source": g.info.source, "meta": json.dumps(g.info.meta), "messages": json.dumps(g.messages),
                "prompt_token_ids": g.prompt_token_ids, **asdict(c),
            }
            for g in selected
            for i, c in enumerate(g.completions)
        ]
        with replacing(path) as tmp:
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
        return len(selected)

    # ----- internals -------------------------------------------------------------------------------------

    def _version(self) -> int:
        """The schema version recorded in the file: 0 for a new, empty database."""
        tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "meta" not in tables:
            if tables:
                raise StoreError(
                    f"{self.path} is a SQLite database but not a grpo-agent trajectory store (no meta table); "
                    "point the store at a new file"
                )
            return 0
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            raise StoreError(f"{self.path} has a meta table without a schema_version; point the store at a new file")
        return int(row[0])

    def _migrate(self, version: int) -> None:
        """Bring the file from `version` to SCHEMA_VERSION, one transaction per version."""
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this grpo-agent knows ({SCHEMA_VERSION}); "
                "upgrade grpo-agent (`pip install -U grpo-agent`)"
            )

        def step(conn: sqlite3.Connection) -> int:
            current = self._version()  # read again under the write lock: another process may have migrated
            if current >= SCHEMA_VERSION:
                return current
            for statement in MIGRATIONS[current]:
                conn.execute(statement)
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(current + 1),))
            return current + 1

        while version < SCHEMA_VERSION:
            version = self._transaction(step)

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """work(connection) inside one BEGIN IMMEDIATE transaction: committed if it returns, rolled back if not."""

        def attempt() -> T:
            self._conn.execute("BEGIN IMMEDIATE")  # take the write lock now, not halfway through
            try:
                result = work(self._conn)
                self._conn.execute("COMMIT")
            except sqlite3.IntegrityError as e:  # e.g. "NOT NULL constraint failed: completions.finish_reason"
                self._conn.execute("ROLLBACK")
                raise StoreError(f"{self.path} refused the write, which was undone ({e}); set that field") from e
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            return result

        return self._retrying(attempt)

    def _retrying(self, fn: Callable[[], T]) -> T:
        """fn(), tried again while another process holds the database lock for longer than busy_timeout."""
        n = 1
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if "locked" not in str(e):
                    raise
                if n == LOCK_ATTEMPTS:
                    raise StoreError(
                        f"{self.path} stayed locked through {LOCK_ATTEMPTS} tries of {BUSY_TIMEOUT_S:g} s each ({e}); "
                        "another process holds a write transaction open: let it finish or stop it"
                    ) from e
            time.sleep(n * RETRY_PAUSE_S)
            n += 1

    def _require_group(self, conn: sqlite3.Connection, group_id: str) -> None:
        if not _group_exists(conn, group_id):
            raise UnknownGroupError(f"no group {group_id!r} in {self.path}; log it with log_group first")

    def _select(
        self, ids: Sequence[str] | None = None, since: float | None = None, policy_version: str | None = None,
        unconsumed: bool = False, source: str | None = None, limit: int | None = None,
    ) -> list[Group]:
        """The groups matching the filters, each with its info, in logging order."""
        where, params = _where(ids, since, policy_version, unconsumed, source)
        sql = f"SELECT * FROM groups{where} ORDER BY created, rowid{_limit(limit, params)}"
        rows = self._conn.execute(sql, params).fetchall()
        completions: dict[str, list[Completion]] = {r["group_id"]: [] for r in rows}
        for c in self._conn.execute(
            "SELECT * FROM completions WHERE group_id IN (SELECT value FROM json_each(?)) ORDER BY group_id, idx",
            (json.dumps(list(completions)),),
        ):
            completions[c["group_id"]].append(Completion(
                text=c["text"], token_ids=json.loads(c["token_ids"]), logprobs=json.loads(c["logprobs"]),
                finish_reason=c["finish_reason"], scores=json.loads(c["scores"]), composite=c["composite"],
                advantage=c["advantage"], mask=None if c["mask"] is None else json.loads(c["mask"]),
                turns=None if c["turns"] is None else json.loads(c["turns"]),
            ))
        return [
            Group(
                messages=json.loads(r["messages"]), prompt_token_ids=json.loads(r["prompt_token_ids"]),
                completions=completions[r["group_id"]], policy_version=r["policy_version"],
                temperature=r["temperature"], zero_variance=bool(r["zero_variance"]), group_id=r["group_id"],
                info=GroupInfo(prompt=r["prompt"], passage_ids=json.loads(r["passage_ids"]),
                               config_hash=r["config_hash"], task_id=r["task_id"], source=r["source"],
                               meta=json.loads(r["meta"]), created=r["created"]),
            )
            for r in rows
        ]


FILTERS = ("ids", "since", "policy_version", "unconsumed", "source", "limit")


def _filter_args(filters: dict) -> dict:
    """`filters` checked against the names `groups()` takes."""
    unknown = sorted(set(filters) - set(FILTERS))
    if unknown:
        raise StoreError(f"unknown filter(s) {unknown}; the filters are {list(FILTERS)}")
    return filters


def _where(
    ids: Sequence[str] | None, since: float | None, policy_version: str | None, unconsumed: bool, source: str | None,
) -> tuple[str, list]:
    """The WHERE clause (or "") and its parameters for the group filters."""
    clauses, params = [], []
    if ids is not None:
        clauses.append("group_id IN (SELECT value FROM json_each(?))")  # one parameter for any number of ids
        params.append(json.dumps(_id_list(ids, "ids")))
    if since is not None:
        clauses.append("created >= ?")
        params.append(since)
    if policy_version is not None:
        clauses.append("policy_version = ?")
        params.append(policy_version)
    if source is not None:
        clauses.append("source = ?")
        params.append(source)
    if unconsumed:
        clauses.append("group_id NOT IN (SELECT group_id FROM update_groups)")
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _limit(limit: int | None, params: list) -> str:
    """" LIMIT ?" with its parameter appended, or "" for no limit."""
    if limit is None:
        return ""
    if limit < 0:
        raise StoreError(f"limit={limit}; give a count >= 0, or None for no limit")
    params.append(limit)
    return " LIMIT ?"


def _id_list(ids: Sequence[str], name: str) -> list[str]:
    if isinstance(ids, str):
        raise StoreError(f"{name}={ids!r} is one string; give a list of group ids, e.g. {name}=[{ids!r}]")
    return list(ids)


def _group_exists(conn: sqlite3.Connection, group_id: str) -> bool:
    return conn.execute("SELECT 1 FROM groups WHERE group_id = ?", (group_id,)).fetchone() is not None


def _dumps(value, what: str) -> str:
    """`value` as JSON text (NaN and +-Infinity kept as Python's json writes them)."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise StoreError(
            f"{what} cannot be stored as JSON ({e}); give plain lists, dicts, strings and numbers (e.g. `.tolist()` "
            "for arrays, `str()` for ids)"
        ) from e


def _real(value: float | None) -> float | None:
    return None if value is None else float(value)  # numpy floats included


def _finite(value):
    """`value` with each NaN or infinite float replaced by None: strict JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
