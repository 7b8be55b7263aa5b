"""The lab's journal: every evaluated recipe kept in an embedded SQLite database, so a
visitor's history survives a browser refresh and a server restart.

One file, `experiments.sqlite3`, in the data folder (`LAYERSCOPE_DATA`, default
`~/.layerscope/`), created on first use. WAL mode and one short connection per call, so
several sessions, threads and server processes write to it at once. Each row is one recipe
one visitor tried on one base model (its fingerprint): the model's spec, the recipe JSON,
every metric, the latency against the base, the history table's row, when it was first and
last measured, and the file names exported from it. A row is unique per (visitor, model,
recipe digest): measuring a recipe again updates its numbers.

Bounded: at most `MAX_ROWS_PER_MODEL` recipes per visitor and model and `MAX_ROWS` in all
(the least recently measured go first). Deleting the file forgets every history, nothing else.

    journal = Journal()                               # the data folder's file
    journal.record("visitor-token", "zoo:code-lm", lab.base.fingerprint, lab.current, lab.base_point.metrics)
    journal.experiments("visitor-token", lab.base.fingerprint)
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from analysis.compress.history import COSTS, LabPoint, higher_is_better, pareto_front, point_row
from analysis.compress.recipe import Recipe
from lib.errors import LayerScopeError
from lib.latency import LatencyChange, Timing
from lib.metrics import LABELS, Metrics

DATA_ENV = "LAYERSCOPE_DATA"
FILE_NAME = "experiments.sqlite3"
MAX_ROWS_PER_MODEL = 200  # recipes kept per visitor and base model
MAX_ROWS = 50_000  # in the whole file (a row takes a few KiB)
VISITOR = re.compile(r"[A-Za-z0-9_-]{8,64}")
BUSY_MS = 30_000  # how long a writer waits for another one's transaction
T = TypeVar("T")

# Each entry takes the schema one version further (PRAGMA user_version = its position + 1).
# Add a new entry for a change; never edit one a released file may already have run.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE experiments (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        visitor TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        spec TEXT NOT NULL,
        digest TEXT NOT NULL,          -- Recipe.digest ('' for the base)
        label TEXT NOT NULL,
        recipe TEXT NOT NULL,          -- Recipe.to_json()
        metrics TEXT NOT NULL,         -- the Metrics record as JSON
        latency TEXT,                  -- the LatencyChange as JSON (NULL when the lab does not time)
        table_row TEXT NOT NULL,       -- history.point_row: every number of the history table
        created REAL NOT NULL,         -- seconds since the epoch, first measured
        updated REAL NOT NULL,         -- last measured
        exported TEXT NOT NULL DEFAULT '',  -- file names downloaded from this recipe, one a line
        UNIQUE (visitor, fingerprint, digest)
    );
    CREATE INDEX experiments_updated ON experiments (updated);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class JournalError(LayerScopeError):
    """The journal's file cannot be opened or written (folder not writable, disk full, a file
    written by a newer LayerScope)."""


def data_folder() -> Path:
    """Where LayerScope keeps its files: `$LAYERSCOPE_DATA`, else `~/.layerscope`."""
    folder = os.environ.get(DATA_ENV, "").strip()
    return Path(folder).expanduser() if folder else Path.home() / ".layerscope"


def check_visitor(visitor: str) -> str:
    if not isinstance(visitor, str) or not VISITOR.fullmatch(visitor):
        raise JournalError("A visitor id is 8 to 64 letters, digits, '-' or '_'.")
    return visitor


@dataclass(frozen=True)
class Experiment:
    """One stored row: a recipe a visitor tried on one base model.

    id: the row's number; metrics, latency: as measured then (None where the stored record
    no longer fits this version's `Metrics` / `LatencyChange`); table_row: the history
    table's row then (`point_row`); created, updated: seconds since the epoch; exported:
    file names downloaded from it."""

    id: int
    spec: str
    fingerprint: str
    digest: str
    label: str
    recipe_json: str
    metrics: Metrics | None
    latency: LatencyChange | None
    table_row: dict[str, Any]
    created: float
    updated: float
    exported: tuple[str, ...]


class Journal:
    """The experiments database at `path` (default: the data folder's `experiments.sqlite3`).
    Holds no connection: each call opens one, so a journal is safe to share between threads."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else data_folder() / FILE_NAME
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise JournalError(f"The folder {self.path.parent} for the experiments database cannot be made ({e}); "
                               f"set {DATA_ENV} to a writable folder.") from e
        self._migrate()

    def _run(self, work: Callable[[sqlite3.Connection], T], write: bool = False) -> T:
        """`work(connection)` on a fresh connection (in one BEGIN IMMEDIATE transaction when it
        writes: the write lock is taken at once, so two writers never deadlock upgrading read
        locks). SQLite answers "locked" at once, without waiting out the busy timeout, while
        another connection switches the file to WAL or recovers it (several sessions opening a
        file at once meet that): the whole call is then tried again, until BUSY_MS."""
        deadline, pause = time.monotonic() + BUSY_MS / 1000, 0.005
        while True:
            try:
                return self._once(work, write)
            except sqlite3.OperationalError as e:
                if ("locked" in str(e) or "busy" in str(e)) and time.monotonic() < deadline:
                    time.sleep(pause)
                    pause = min(2 * pause, 0.2)
                    continue
                raise JournalError(self._problem(e)) from e
            except sqlite3.Error as e:
                raise JournalError(self._problem(e)) from e

    def _once(self, work: Callable[[sqlite3.Connection], T], write: bool) -> T:
        conn = sqlite3.connect(self.path, timeout=BUSY_MS / 1000, isolation_level=None)  # autocommit
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_MS}")
            conn.execute("PRAGMA synchronous = NORMAL")  # with WAL: durable at checkpoints, never corrupt
            if not write:
                return work(conn)
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result
        finally:
            conn.close()

    def _problem(self, error: sqlite3.Error) -> str:
        return (f"The experiments database {self.path} cannot be used ({error}). Deleting the file forgets the "
                "saved histories and nothing else.")

    def _migrate(self) -> None:
        self._run(lambda conn: conn.execute("PRAGMA journal_mode = WAL"))  # persistent; outside a transaction
        self._run(self._upgrade, write=True)

    def _upgrade(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise JournalError(f"The experiments database {self.path} was written by a newer LayerScope (schema "
                               f"{version}; this one reads up to {SCHEMA_VERSION}). Set {DATA_ENV} to another "
                               "folder, or update LayerScope.")
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")

    def schema_version(self) -> int:
        return self._run(lambda conn: conn.execute("PRAGMA user_version").fetchone()[0])

    # ------------------------------------------------------------------ writing

    def record(self, visitor: str, spec: str, fingerprint: str, point: LabPoint, base: Metrics) -> int:
        """Store `point` (measured on the model `fingerprint`, loaded as `spec`) for `visitor`;
        a recipe stored before gets the new numbers. Returns the row's id."""
        check_visitor(visitor)
        now = time.time()
        values = dict(visitor=visitor, fingerprint=fingerprint, spec=spec, digest=point.digest, label=point.label,
                      recipe=point.recipe_json, metrics=json.dumps(dataclasses.asdict(point.metrics)),
                      latency=None if point.latency is None else json.dumps(dataclasses.asdict(point.latency)),
                      table_row=json.dumps(point_row(point, base, False), default=str), created=now, updated=now)

        def work(conn: sqlite3.Connection) -> int:
            conn.execute(
                f"INSERT INTO experiments ({', '.join(values)}) VALUES ({', '.join(':' + k for k in values)}) "
                "ON CONFLICT (visitor, fingerprint, digest) DO UPDATE SET spec = excluded.spec, "
                "label = excluded.label, recipe = excluded.recipe, metrics = excluded.metrics, "
                "latency = excluded.latency, table_row = excluded.table_row, updated = excluded.updated", values)
            row_id = conn.execute("SELECT id FROM experiments WHERE visitor = ? AND fingerprint = ? AND digest = ?",
                                  (visitor, fingerprint, point.digest)).fetchone()[0]
            # the bounds: the least recently measured go first (a model's base row stays)
            conn.execute("DELETE FROM experiments WHERE id IN (SELECT id FROM experiments WHERE visitor = ? AND "
                         "fingerprint = ? AND digest != '' ORDER BY updated DESC, id DESC LIMIT -1 OFFSET ?)",
                         (visitor, fingerprint, MAX_ROWS_PER_MODEL))
            conn.execute("DELETE FROM experiments WHERE id IN (SELECT id FROM experiments "
                         "ORDER BY updated DESC, id DESC LIMIT -1 OFFSET ?)", (MAX_ROWS,))
            return row_id

        return self._run(work, write=True)

    def mark_exported(self, visitor: str, fingerprint: str, digest: str, file_name: str) -> None:
        """Note that `file_name` was downloaded from this visitor's recipe `digest`."""
        check_visitor(visitor)
        self._run(lambda conn: conn.execute(
            "UPDATE experiments SET exported = CASE WHEN exported = '' THEN :name "
            "WHEN instr(char(10) || exported || char(10), char(10) || :name || char(10)) > 0 THEN exported "
            "ELSE exported || char(10) || :name END WHERE visitor = :visitor AND fingerprint = :fingerprint "
            "AND digest = :digest", dict(name=file_name, visitor=visitor, fingerprint=fingerprint, digest=digest)),
            write=True)

    def delete(self, visitor: str, row_id: int) -> bool:
        """Forget one of this visitor's rows (another visitor's row is left alone); True if it went."""
        check_visitor(visitor)
        return self._run(lambda conn: conn.execute("DELETE FROM experiments WHERE id = ? AND visitor = ?",
                                                   (int(row_id), visitor)).rowcount > 0, write=True)

    # ------------------------------------------------------------------ reading

    def experiments(self, visitor: str, fingerprint: str) -> list[Experiment]:
        """This visitor's rows for the model `fingerprint`, the base first, then in the order
        they were first measured. Another visitor's rows are never returned."""
        check_visitor(visitor)
        rows = self._run(lambda conn: conn.execute(
            "SELECT id, spec, fingerprint, digest, label, recipe, metrics, latency, table_row, created, updated, "
            "exported FROM experiments WHERE visitor = ? AND fingerprint = ? ORDER BY digest != '', created, id",
            (visitor, fingerprint)).fetchall())
        return [_experiment(row) for row in rows]

    def row_id(self, visitor: str, fingerprint: str, digest: str) -> int | None:
        check_visitor(visitor)
        row = self._run(lambda conn: conn.execute(
            "SELECT id FROM experiments WHERE visitor = ? AND fingerprint = ? AND digest = ?",
            (visitor, fingerprint, digest)).fetchone())
        return None if row is None else row[0]

    def shared_recipe(self, row_id: int, digest: str) -> str | None:
        """The recipe JSON of row `row_id` if its digest is `digest` (a link names both, so it
        opens that one recipe and nothing else of its visitor's); None if there is none."""
        row = self._run(lambda conn: conn.execute("SELECT recipe FROM experiments WHERE id = ? AND digest = ?",
                                                  (int(row_id), str(digest))).fetchone())
        return None if row is None else row[0]


def _experiment(row: tuple) -> Experiment:
    (row_id, spec, fingerprint, digest, label, recipe, metrics, latency, table_row, created, updated,
     exported) = row
    return Experiment(row_id, spec, fingerprint, digest, label, recipe, _metrics(metrics), _latency(latency),
                      _json(table_row) or {}, created, updated, tuple(n for n in exported.split("\n") if n))


def _json(text: str | None) -> Any:
    try:
        return None if text is None else json.loads(text)
    except ValueError:
        return None


def _fields(kind: type, data: Any) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(kind)}
    return {k: v for k, v in data.items() if k in names} if isinstance(data, dict) else {}


def _metrics(text: str) -> Metrics | None:
    """The stored record as this version's `Metrics` (fields it no longer has are dropped;
    None if a field it needs is missing)."""
    try:
        return Metrics(**_fields(Metrics, _json(text)))
    except TypeError:
        return None


def _latency(text: str | None) -> LatencyChange | None:
    data = _json(text)
    if not isinstance(data, dict):
        return None
    try:
        timings = {k: Timing(**_fields(Timing, data.get(k))) for k in ("base", "model")}
        return LatencyChange(**{**_fields(LatencyChange, data), **timings})
    except TypeError:
        return None


# ---------------------------------------------------------------------- the lab's history


def history_points(stored: Sequence[Experiment], session: Sequence[LabPoint], base: LabPoint,
                   current: LabPoint | None = None, unstored: bool = False) -> list[LabPoint]:
    """The history a lab page draws: `base` (measured now) at step 0, then every stored recipe
    in the order first measured, each as the `LabPoint` this session measured for it if it
    did, else as measured then; then `current` if it is not among them, and with `unstored`
    every session point that is not (the journal cannot be used). Steps renumbered 0..n-1.
    Rows whose recipe or metrics this version cannot read are left out."""
    mine = {p.digest: p for p in session}
    points, seen = [base], {base.digest}
    for row in stored:
        if row.digest in seen:
            continue
        point = mine.get(row.digest) or _stored_point(row)
        if point is not None:
            points.append(point)
            seen.add(row.digest)
    extra = list(session) if unstored else [current] if current is not None else []
    for point in extra:
        if point.digest not in seen:
            points.append(point)
            seen.add(point.digest)
    return [dataclasses.replace(p, step=i) for i, p in enumerate(points)]


def _stored_point(row: Experiment) -> LabPoint | None:
    if row.metrics is None:
        return None
    try:
        edits = tuple(Recipe.from_json(row.recipe_json).edits)
    except LayerScopeError:
        return None
    return LabPoint(0, edits, row.digest, row.label, row.recipe_json, row.metrics, None, row.latency)


def frontier(points: Sequence[LabPoint], cost: str, quality: str) -> list[int]:
    """Steps of `points` on the Pareto frontier of `cost` against `quality` (as `Lab.frontier`)."""
    if cost not in COSTS or quality not in LABELS:
        raise JournalError(f"The frontier is drawn against {' or '.join(COSTS)} and a metric.")
    usable = [p for p in points if p.cost(cost) is not None and getattr(p.metrics, quality) is not None]
    front = pareto_front([p.cost(cost) for p in usable], [getattr(p.metrics, quality) for p in usable],
                         higher_is_better(quality))
    return [usable[i].step for i in front]


def experiments_csv(stored: Sequence[Experiment]) -> str:
    """The stored rows as CSV: the history table's columns, then when each was first and
    last measured (UTC) and what was exported from it."""
    rows = []
    for row in stored:
        table = {k: v for k, v in row.table_row.items() if k not in ("step", "current")}
        table.update(spec=row.spec, first_measured=_utc(row.created), last_measured=_utc(row.updated),
                     exported=" ".join(row.exported))
        rows.append(table)
    names = list(dict.fromkeys(k for r in rows for k in r)) or ["label"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if r.get(k) is None else r.get(k) for k in names} for r in rows)
    return out.getvalue()


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))
