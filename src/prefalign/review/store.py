"""The review's SQLite file: the items, which annotator holds which item, and every judgement.

Durability: WAL journal with synchronous=FULL, and every change is one `BEGIN IMMEDIATE ... COMMIT`
on a connection of its own. A judgement is committed (its WAL frame synced) before the request that
saved it returns, so the page shows the next item only after the last one is on disk, and killing the
server loses nothing. SQLite serialises the writers, so several annotators (threads of one server, or
several servers on one file) never see or leave half-written state.

Who sees what: an annotator is served, first, an item they hold and have not judged (the one they
were shown before a reload or a restart, or the one they just undid), else the first item (file
order) they have not judged whose judgements plus other annotators' live holds are fewer than k. A
hold is live for `hold_seconds` after it was last shown, so an annotator who walks away frees their
items (and, coming back later, may still judge the item on their screen: then it has k + 1 judgements).
Sides are randomised per (item, annotator) by a keyed hash: the same person sees the same sides after
a reload, and different people see independent sides.

Undo after a reveal: saving a judgement shows which answer was which (the issue asks for the names
once the judgement is saved), so an annotator who then undoes it judges the same item again knowing
the names. That is allowed (undo is for slips) but recorded: the undo is kept in `undone`, and the
judgement given again is saved with `revised_after_reveal = 1` (counted in the summary and review.json,
and kept per judgement in the export's quarantine lines), so an analysis can leave those out.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..data import text_of
from ..errors import ConfigError, DataError
from .agreement import VERDICTS
from .items import Item

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY, prompt TEXT NOT NULL, first TEXT NOT NULL, second TEXT NOT NULL,
    first_name TEXT NOT NULL, second_name TEXT NOT NULL, source TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS holds (
    item INTEGER NOT NULL REFERENCES items(id), annotator TEXT NOT NULL, touched REAL NOT NULL,
    PRIMARY KEY (item, annotator));
CREATE TABLE IF NOT EXISTS judgements (
    id INTEGER PRIMARY KEY AUTOINCREMENT, item INTEGER NOT NULL REFERENCES items(id),
    annotator TEXT NOT NULL, verdict TEXT NOT NULL CHECK (verdict IN ('first', 'second', 'tie', 'both_bad')),
    swapped INTEGER NOT NULL, comment TEXT NOT NULL, better TEXT NOT NULL, created REAL NOT NULL,
    revised_after_reveal INTEGER NOT NULL DEFAULT 0, UNIQUE (item, annotator));
CREATE INDEX IF NOT EXISTS judgements_of ON judgements (annotator, id);
CREATE TABLE IF NOT EXISTS undone (
    item INTEGER NOT NULL REFERENCES items(id), annotator TEXT NOT NULL, PRIMARY KEY (item, annotator));
"""
SIDES = {"a": ("first", "second"), "b": ("second", "first")}  # side -> verdict when not swapped / swapped


class Conflict(Exception):
    """A request that does not fit the state (an item not served to this annotator, judged twice)."""


class Store:
    def __init__(self, path: str | Path, hold_seconds: float = 1800.0):
        self.path, self.hold_seconds = Path(path), hold_seconds
        try:
            con = self._connect()
        except sqlite3.DatabaseError as e:
            raise DataError(f"{self.path}: not a review file ({e})") from None
        try:
            con.execute("PRAGMA journal_mode=WAL")  # persistent: recorded in the file itself
            con.executescript(SCHEMA)
            columns = {r[1] for r in con.execute("PRAGMA table_info(judgements)")}
            if "revised_after_reveal" not in columns:  # a file written before the flag existed
                con.execute("ALTER TABLE judgements ADD COLUMN revised_after_reveal INTEGER NOT NULL DEFAULT 0")
        except sqlite3.DatabaseError as e:
            raise DataError(f"{self.path}: not a review file ({e})") from None
        finally:
            con.close()

    def _connect(self) -> sqlite3.Connection:
        # autocommit mode: transactions are the explicit BEGIN IMMEDIATE of `_write`
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        try:
            con.execute("PRAGMA synchronous=FULL")  # the commit is on disk, not only in the OS's cache
            con.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error:
            con.close()
            raise
        con.row_factory = sqlite3.Row
        return con

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")  # take the write lock now: no other writer between read and write
            yield con
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        finally:
            con.close()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        con = self._connect()
        try:
            con.execute("BEGIN")  # one snapshot for every query of the read
            yield con
            con.execute("COMMIT")
        finally:
            con.close()

    # ------------------------------------------------------------------ set-up

    def meta(self) -> dict[str, Any]:
        with self._read() as con:
            return {r["key"]: json.loads(r["value"]) for r in con.execute("SELECT key, value FROM meta")}

    def item_count(self) -> int:
        with self._read() as con:
            return con.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def create(self, items: list[Item], source: dict[str, Any], per_item: int) -> None:
        """Write the items and what they came from, once, in one transaction."""
        with self._write() as con:
            if con.execute("SELECT COUNT(*) FROM items").fetchone()[0]:
                raise ConfigError(f"{self.path} already holds items")
            con.executemany("INSERT INTO items (prompt, first, second, first_name, second_name, source) "
                            "VALUES (?, ?, ?, ?, ?, ?)",
                            [(json.dumps(i.prompt), json.dumps(i.first), json.dumps(i.second), i.first_name,
                              i.second_name, i.source) for i in items])
            meta = {"source": source, "per_item": per_item, "salt": secrets.token_hex(16), "created": time.time()}
            con.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                            [(k, json.dumps(v)) for k, v in meta.items()])

    def set_per_item(self, per_item: int) -> None:
        with self._write() as con:
            con.execute("UPDATE meta SET value = ? WHERE key = 'per_item'", (json.dumps(per_item),))

    # ------------------------------------------------------------------ serving

    def swapped(self, item: int, annotator: str, salt: str) -> bool:
        h = hashlib.blake2b(f"{item}\x00{annotator}".encode(), key=bytes.fromhex(salt), digest_size=8)
        return bool(h.digest()[0] & 1)

    def _settings(self, con: sqlite3.Connection) -> tuple[int, str]:
        rows = dict(con.execute("SELECT key, value FROM meta WHERE key IN ('per_item', 'salt')").fetchall())
        return json.loads(rows["per_item"]), json.loads(rows["salt"])

    # the items an annotator (:who) may still take: not judged by them, with fewer than :k judgements plus
    # other annotators' live holds (touched after :cutoff); also what counts their progress
    OPEN_ITEMS = """
        SELECT i.id FROM items i
        WHERE NOT EXISTS (SELECT 1 FROM judgements j WHERE j.item = i.id AND j.annotator = :who)
          AND (SELECT COUNT(*) FROM judgements j WHERE j.item = i.id)
            + (SELECT COUNT(*) FROM holds h WHERE h.item = i.id AND h.annotator != :who AND h.touched > :cutoff
               AND NOT EXISTS (SELECT 1 FROM judgements j WHERE j.item = h.item AND j.annotator = h.annotator))
            < :k"""

    def next_for(self, annotator: str) -> dict[str, Any]:
        """The item to show `annotator` (held for them from now on) and their progress."""
        now = time.time()
        with self._write() as con:
            k, salt = self._settings(con)
            args = {"who": annotator, "k": k, "cutoff": now - self.hold_seconds}
            held = con.execute(
                "SELECT h.item FROM holds h WHERE h.annotator = :who AND NOT EXISTS (SELECT 1 FROM judgements j "
                "WHERE j.item = h.item AND j.annotator = :who) ORDER BY h.touched DESC, h.item LIMIT 1",
                args).fetchone()
            item = held[0] if held else None
            if item is None:
                row = con.execute(self.OPEN_ITEMS + " ORDER BY i.id LIMIT 1", args).fetchone()
                item = row[0] if row else None
            if item is not None:  # taken, or shown again: the hold is live from now
                con.execute("INSERT OR REPLACE INTO holds (item, annotator, touched) VALUES (?, ?, ?)",
                            (item, annotator, now))
            view = self._view(con, item, annotator, salt) if item is not None else None
            return {"item": view, "progress": self._progress(con, args)}

    def _view(self, con: sqlite3.Connection, item: int, annotator: str, salt: str) -> dict[str, Any]:
        """What the page shows: the prompt and the two answers on this annotator's sides, no names."""
        row = con.execute("SELECT * FROM items WHERE id = ?", (item,)).fetchone()
        first, second = text_of(json.loads(row["first"])), text_of(json.loads(row["second"]))
        a, b = (second, first) if self.swapped(item, annotator, salt) else (first, second)
        return {"id": item, "prompt": text_of(json.loads(row["prompt"])), "a": a, "b": b}

    def _progress(self, con: sqlite3.Connection, args: dict[str, Any]) -> dict[str, int]:
        """n of N for this annotator (N: what they judged plus what they may still take, which shrinks as
        others fill items when k < the number of annotators), and the items judged k times of all."""
        done = con.execute("SELECT COUNT(*) FROM judgements WHERE annotator = :who", args).fetchone()[0]
        left = con.execute(f"SELECT COUNT(*) FROM ({self.OPEN_ITEMS})", args).fetchone()[0]
        items = con.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        complete = con.execute("SELECT COUNT(*) FROM (SELECT item FROM judgements GROUP BY item "
                               "HAVING COUNT(*) >= :k)", args).fetchone()[0]
        return {"done": done, "total": done + left, "items": items, "items_complete": complete,
                "per_item": args["k"]}

    def judge(self, annotator: str, item: int, side: str, comment: str = "", better: str = "") -> dict[str, Any]:
        """Record a judgement given in the annotator's sides ("a", "b", "tie", "both_bad"); returns what
        the sides were (the names hidden until now)."""
        with self._write() as con:
            _, salt = self._settings(con)
            if not con.execute("SELECT 1 FROM holds WHERE item = ? AND annotator = ?", (item, annotator)).fetchone():
                raise Conflict(f"item {item} was not shown to {annotator!r}")
            if con.execute("SELECT 1 FROM judgements WHERE item = ? AND annotator = ?", (item, annotator)).fetchone():
                raise Conflict(f"{annotator!r} has already judged item {item}")
            swapped = self.swapped(item, annotator, salt)
            verdict = SIDES[side][swapped] if side in SIDES else side
            assert verdict in VERDICTS, verdict
            revised = con.execute("SELECT 1 FROM undone WHERE item = ? AND annotator = ?",
                                  (item, annotator)).fetchone() is not None  # they have seen the names
            con.execute("INSERT INTO judgements (item, annotator, verdict, swapped, comment, better, created, "
                        "revised_after_reveal) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (item, annotator, verdict, int(swapped), comment, better, time.time(), int(revised)))
            return {"item": item, "verdict": side, **self._names(con, item, swapped)}

    def _names(self, con: sqlite3.Connection, item: int, swapped: bool) -> dict[str, str]:
        row = con.execute("SELECT first_name, second_name FROM items WHERE id = ?", (item,)).fetchone()
        a, b = (row[1], row[0]) if swapped else (row[0], row[1])
        return {"a_name": a, "b_name": b}

    def undo(self, annotator: str) -> dict[str, Any] | None:
        """Remove `annotator`'s last judgement; its item is the next one they are shown (held anew)."""
        with self._write() as con:
            row = con.execute("SELECT * FROM judgements WHERE annotator = ? ORDER BY id DESC LIMIT 1",
                              (annotator,)).fetchone()
            if row is None:
                return None
            con.execute("DELETE FROM judgements WHERE id = ?", (row["id"],))
            con.execute("INSERT OR IGNORE INTO undone (item, annotator) VALUES (?, ?)", (row["item"], annotator))
            con.execute("INSERT OR REPLACE INTO holds (item, annotator, touched) VALUES (?, ?, ?)",
                        (row["item"], annotator, time.time()))
            side = row["verdict"] if row["verdict"] in ("tie", "both_bad") else \
                ("a" if (row["verdict"] == "first") != bool(row["swapped"]) else "b")
            return {"item": row["item"], "verdict": side, "comment": row["comment"], "better": row["better"]}

    # ------------------------------------------------------------------ reading everything

    def items_with_judgements(self) -> list[dict[str, Any]]:
        """Every item with its judgements (oldest first): what the summary and the export read."""
        with self._read() as con:
            items = {r["id"]: {"id": r["id"], "prompt": json.loads(r["prompt"]), "first": json.loads(r["first"]),
                               "second": json.loads(r["second"]), "first_name": r["first_name"],
                               "second_name": r["second_name"], "source": r["source"], "judgements": []}
                     for r in con.execute("SELECT * FROM items ORDER BY id")}
            for r in con.execute("SELECT item, annotator, verdict, comment, better, created, revised_after_reveal "
                                 "FROM judgements ORDER BY id"):
                judgement = {k: r[k] for k in r.keys() if k != "item"}
                judgement["revised_after_reveal"] = bool(judgement["revised_after_reveal"])
                items[r["item"]]["judgements"].append(judgement)
        return list(items.values())
