"""The lab's journal (`analysis.compress.journal`): the schema and its migrations, a lab's
points stored and read back, one visitor never seeing another's rows, the bounds, and
several threads and processes writing to one file at once."""

import csv
import io
import json
import multiprocessing
import sqlite3
import threading

import pytest

from analysis.compress import journal as jr
from analysis.compress.history import LabPoint, recipe_digest, recipe_label
from analysis.compress.journal import Journal, JournalError
from analysis.compress.lab import Lab
from analysis.compress.prune.pruning import Drop, Magnitude
from analysis.compress.recipe import Recipe
from lib import data
from lib.latency import LatencyChange, Timing
from lib.metrics import Metrics

ALICE, BOB = "alice-visitor-1", "bob-visitor-22"
BASE = Metrics(n_params=1000, size_bits=32000, latency_ms=5.0, perplexity=10.0, agreement=1.0, kl_to_base=0.0)


def point(sparsity: float | None, bpb: float = 1.0, fingerprint: str = "fp-a") -> LabPoint:
    """A hand-made point: magnitude pruning at `sparsity` (None: the base), with a latency."""
    edits = () if sparsity is None else (Magnitude(sparsity),)
    timing = Timing(4.0, 3.5, 4.5, 6, 16)
    latency = LatencyChange(timing, Timing(3.0, 2.8, 3.3, 6, 16), 0.75, 0.7, 0.8, 0.9)
    metrics = Metrics(n_params=1000, size_bits=32000, latency_ms=3.0, perplexity=12.0, bits_per_byte=bpb,
                      agreement=0.9, kl_to_base=0.1)
    return LabPoint(0, edits, recipe_digest(edits), recipe_label(edits),
                    Recipe(fingerprint, list(edits), model="m").to_json(), metrics, None, latency)


@pytest.fixture
def book(tmp_path, monkeypatch):
    monkeypatch.setenv(jr.DATA_ENV, str(tmp_path / "data"))
    return Journal()


def test_the_file_is_made_on_first_use_in_the_data_folder_in_wal_mode(book, tmp_path):
    assert book.path == tmp_path / "data" / jr.FILE_NAME and book.path.exists()
    assert book.schema_version() == jr.SCHEMA_VERSION >= 1
    with sqlite3.connect(book.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_default_data_folder_is_in_home_unless_the_variable_says(monkeypatch, tmp_path):
    monkeypatch.delenv(jr.DATA_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert jr.data_folder() == tmp_path / "home" / ".layerscope"
    monkeypatch.setenv(jr.DATA_ENV, str(tmp_path / "elsewhere"))
    assert jr.data_folder() == tmp_path / "elsewhere"


def test_a_labs_points_round_trip(book, tiny_lm):
    batch = data.code_batch(tiny_lm.tokenizer, seq_len=32, n_windows=4)
    lab = Lab(tiny_lm, batch, latency_repeats=0)
    lab.add(Magnitude(0.5))
    lab.add(Drop("mlp", 1))
    for p in lab.history:
        book.record(ALICE, tiny_lm.spec, tiny_lm.fingerprint, p, lab.base_point.metrics)
    rows = book.experiments(ALICE, tiny_lm.fingerprint)
    assert [r.digest for r in rows] == [p.digest for p in lab.history]
    assert [r.metrics for r in rows] == [p.metrics for p in lab.history]  # every metric, exactly
    assert [Recipe.from_json(r.recipe_json).edits for r in rows] == [list(p.edits) for p in lab.history]
    assert rows[2].table_row["label"] == "magnitude 50% (all, per layer) + drop mlp 1" and rows[0].spec == tiny_lm.spec
    assert rows[0].created <= rows[1].created <= rows[2].created


def test_recording_again_updates_the_row_and_latency_survives(book):
    first = book.record(ALICE, "m", "fp-a", point(0.5, bpb=1.5), BASE)
    again = book.record(ALICE, "m", "fp-a", point(0.5, bpb=1.25), BASE)
    (row,) = book.experiments(ALICE, "fp-a")
    assert first == again == row.id and row.metrics.bits_per_byte == 1.25 and row.updated >= row.created
    assert row.latency == point(0.5).latency and row.latency.text() == point(0.5).latency.text()


def test_a_visitor_sees_only_their_own_rows(book):
    book.record(ALICE, "m", "fp-a", point(0.5), BASE)
    book.record(BOB, "m", "fp-a", point(0.3), BASE)
    book.record(ALICE, "m", "fp-b", point(0.2, fingerprint="fp-b"), BASE)
    assert [r.label for r in book.experiments(ALICE, "fp-a")] == ["magnitude 50% (all, per layer)"]
    assert [r.label for r in book.experiments(BOB, "fp-a")] == ["magnitude 30% (all, per layer)"]
    assert book.experiments("carol-visitor", "fp-a") == []
    bobs = book.experiments(BOB, "fp-a")[0]
    assert not book.delete(ALICE, bobs.id) and book.experiments(BOB, "fp-a")  # not Alice's to delete
    assert book.delete(BOB, bobs.id) and book.experiments(BOB, "fp-a") == []
    with pytest.raises(JournalError, match="visitor id"):
        book.experiments("x'; DROP TABLE experiments; --", "fp-a")


def test_a_shared_row_opens_by_id_and_digest_only(book):
    row = book.record(ALICE, "m", "fp-a", point(0.5), BASE)
    digest = point(0.5).digest
    assert json.loads(book.shared_recipe(row, digest))["edits"][0]["sparsity"] == 0.5
    assert book.shared_recipe(row, "0" * 16) is None and book.shared_recipe(row + 1, digest) is None
    assert book.row_id(ALICE, "fp-a", digest) == row and book.row_id(BOB, "fp-a", digest) is None


def test_rows_are_bounded_per_visitor_and_model_keeping_the_base(book, monkeypatch):
    monkeypatch.setattr(jr, "MAX_ROWS_PER_MODEL", 3)
    book.record(ALICE, "m", "fp-a", point(None), BASE)
    for k in range(1, 7):
        book.record(ALICE, "m", "fp-a", point(k / 10), BASE)
    book.record(BOB, "m", "fp-a", point(0.9), BASE)
    kept = [r.label for r in book.experiments(ALICE, "fp-a")]
    assert kept == ["base (no edits)"] + [f"magnitude {k}0% (all, per layer)" for k in (4, 5, 6)]
    assert len(book.experiments(BOB, "fp-a")) == 1
    monkeypatch.setattr(jr, "MAX_ROWS", 2)
    book.record(BOB, "m", "fp-a", point(0.8), BASE)
    assert len(book.experiments(ALICE, "fp-a")) + len(book.experiments(BOB, "fp-a")) == 2


def test_exports_are_noted_once_each(book):
    book.record(ALICE, "m", "fp-a", point(0.5), BASE)
    digest = point(0.5).digest
    for name in ("m-model.zip", "m-report.html", "m-model.zip"):
        book.mark_exported(ALICE, "fp-a", digest, name)
    book.mark_exported(BOB, "fp-a", digest, "not-alice.zip")
    assert book.experiments(ALICE, "fp-a")[0].exported == ("m-model.zip", "m-report.html")


def test_migrations_run_in_order_and_keep_rows(tmp_path, monkeypatch):
    path = tmp_path / "old.sqlite3"
    Journal(path).record(ALICE, "m", "fp-a", point(0.5), BASE)
    later = jr.MIGRATIONS + ("ALTER TABLE experiments ADD COLUMN note TEXT NOT NULL DEFAULT 'later'",)
    monkeypatch.setattr(jr, "MIGRATIONS", later)
    monkeypatch.setattr(jr, "SCHEMA_VERSION", len(later))
    reopened = Journal(path)
    assert reopened.schema_version() == len(later)
    assert [r.label for r in reopened.experiments(ALICE, "fp-a")] == ["magnitude 50% (all, per layer)"]
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT note FROM experiments").fetchall() == [("later",)]


def test_a_file_from_a_newer_version_or_an_unusable_folder_is_refused_in_words(tmp_path):
    path = tmp_path / "new.sqlite3"
    Journal(path)
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {jr.SCHEMA_VERSION + 1}")
    with pytest.raises(JournalError, match="newer LayerScope"):
        Journal(path)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(JournalError, match="cannot be made"):
        Journal(tmp_path / "a-file" / "sub" / jr.FILE_NAME)
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"not a database" * 100)
    with pytest.raises(JournalError, match="cannot be used"):
        Journal(garbage)


def _writer(path: str, visitor: str, n: int) -> None:
    book = Journal(path)
    for k in range(n):
        book.record(visitor, "m", "fp-a", point(round(0.01 * (k + 1), 2)), BASE)


def test_threads_and_processes_write_at_once(tmp_path):
    path = str(tmp_path / "shared.sqlite3")
    n = 15
    threads = [threading.Thread(target=_writer, args=(path, f"thread-visitor-{i}", n)) for i in range(6)]
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_writer, args=(path, f"process-visitor-{i}", n)) for i in range(3)]
    for worker in processes + threads:  # fork before any thread here holds a lock (SQLite's own, in memory)
        worker.start()
    for worker in threads + processes:
        worker.join(timeout=120)
    assert [p.exitcode for p in processes] == [0, 0, 0]
    book = Journal(path)
    for visitor in [f"thread-visitor-{i}" for i in range(6)] + [f"process-visitor-{i}" for i in range(3)]:
        assert len(book.experiments(visitor, "fp-a")) == n, visitor
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_history_points_merge_stored_and_session_rows(book):
    for p in (point(None), point(0.5), point(0.3)):
        book.record(ALICE, "m", "fp-a", p, BASE)
    with sqlite3.connect(book.path) as conn:  # a row this version cannot read is left out
        conn.execute("UPDATE experiments SET recipe = '{\"edits\": [{\"type\": \"gone\"}]}' WHERE label LIKE '%30%'")
    rows = book.experiments(ALICE, "fp-a")
    base, mine = point(None), point(0.5, bpb=2.0)  # this session measured 50 % again
    fresh = point(0.7, bpb=3.0)  # current, not stored
    points = jr.history_points(rows, [base, mine, fresh], base, current=fresh)
    assert [p.step for p in points] == [0, 1, 2]
    assert [p.label for p in points] == ["base (no edits)", "magnitude 50% (all, per layer)",
                                         "magnitude 70% (all, per layer)"]
    assert points[1].metrics.bits_per_byte == 2.0  # the session's own numbers win
    assert len(jr.history_points([], [base, mine, fresh], base, unstored=True)) == 3
    assert jr.frontier(points, "size_bits", "bits_per_byte") == [0]


def test_experiments_csv_has_every_number_and_the_times(book):
    book.record(ALICE, "m", "fp-a", point(None), BASE)
    book.record(ALICE, "m", "fp-a", point(0.5), BASE)
    book.mark_exported(ALICE, "fp-a", point(0.5).digest, "m-model.zip")
    rows = list(csv.DictReader(io.StringIO(jr.experiments_csv(book.experiments(ALICE, "fp-a")))))
    assert [r["label"] for r in rows] == ["base (no edits)", "magnitude 50% (all, per layer)"]
    assert rows[1]["bits_per_byte"] == "1.0" and rows[1]["exported"] == "m-model.zip"
    assert rows[1]["latency_ratio"] == "0.75" and rows[0]["first_measured"][:2] == "20"
