"""Embedded registry in one SQLite file: no server, shared by every process on the host.

Each process opens its own connection (WAL journal, so readers do not block the writer).
Revisions come from one counter row updated inside every write transaction, so they are
totally ordered across processes. Leases expire on the wall clock (``time.time()``, shared by
the processes): any call first deletes the keys of expired leases, with delete events, so an
expiry is seen by the next call of anyone (a watcher polls at least every ``poll_s``).
Watches poll the event table (``poll_s``, default 50 ms). Events older than ``history``
revisions are pruned.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time

from .base import Entry, Event, Registry, RegistryError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (id INTEGER PRIMARY KEY CHECK (id = 0), rev INTEGER NOT NULL,
                                 lease_seq INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES (0, 0, 0);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, mod_rev INTEGER NOT NULL,
                               lease INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (rev INTEGER PRIMARY KEY, type TEXT NOT NULL, key TEXT NOT NULL,
                                   value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS leases (id INTEGER PRIMARY KEY, ttl REAL NOT NULL, expires REAL NOT NULL);
"""


class SqliteRegistry(Registry):
    def __init__(self, path: str | os.PathLike, poll_s: float = 0.05, history: int = 100_000) -> None:
        self.path = os.fspath(path)
        self.url = f"sqlite:{self.path}"
        self.poll_s = poll_s
        self.history = history
        self._lock = threading.Lock()  # one connection, used from several threads in turn
        try:
            self._db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)  # idempotent; executescript commits by itself
        except sqlite3.Error as e:
            raise RegistryError(f"cannot open the registry file {self.path}: {e}") from e

    # -- transactions ------------------------------------------------------------------------
    class _Tx:
        def __init__(self, reg: SqliteRegistry) -> None:
            self.reg = reg

        def __enter__(self) -> sqlite3.Connection:
            self.reg._lock.acquire()
            try:
                self.reg._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                self.reg._lock.release()
                raise RegistryError(f"registry {self.reg.path}: {e}") from e
            return self.reg._db

        def __exit__(self, et, ev, tb) -> None:
            try:
                self.reg._db.execute("COMMIT" if et is None else "ROLLBACK")
            except sqlite3.Error as e:
                if et is None:
                    raise RegistryError(f"registry {self.reg.path}: {e}") from e
            finally:
                self.reg._lock.release()

    def _tx(self) -> SqliteRegistry._Tx:
        return SqliteRegistry._Tx(self)

    def _bump(self, db: sqlite3.Connection) -> int:
        db.execute("UPDATE meta SET rev = rev + 1 WHERE id = 0")
        return db.execute("SELECT rev FROM meta WHERE id = 0").fetchone()[0]

    def _change(self, db: sqlite3.Connection, type_: str, key: str, value: str, lease: int = 0) -> int:
        rev = self._bump(db)
        if type_ == "put":
            db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?)", (key, value, rev, lease))
        else:
            db.execute("DELETE FROM kv WHERE key = ?", (key,))
        db.execute("INSERT INTO events VALUES (?, ?, ?, ?)", (rev, type_, key, value))
        if rev % 1000 == 0:
            db.execute("DELETE FROM events WHERE rev <= ?", (rev - self.history,))
        return rev

    def _expire(self, db: sqlite3.Connection) -> None:
        gone = [r[0] for r in db.execute("SELECT id FROM leases WHERE expires <= ?", (time.time(),))]
        for lid in gone:
            self._drop_lease(db, lid)

    def _drop_lease(self, db: sqlite3.Connection, lid: int) -> None:
        db.execute("DELETE FROM leases WHERE id = ?", (lid,))
        for (k,) in db.execute("SELECT key FROM kv WHERE lease = ? ORDER BY key", (lid,)).fetchall():
            self._change(db, "delete", k, "")

    def _check_lease(self, db: sqlite3.Connection, lease: int) -> None:
        if lease and db.execute("SELECT 1 FROM leases WHERE id = ?", (lease,)).fetchone() is None:
            raise RegistryError(f"lease {lease} does not exist (expired or revoked)")

    def _has_expired(self) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM leases WHERE expires <= ? LIMIT 1", (time.time(),))
            return row.fetchone() is not None

    def _read(self, sql: str, args: tuple) -> list[tuple]:
        if self._has_expired():
            with self._tx() as db:
                self._expire(db)
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- the interface -----------------------------------------------------------------------
    def put(self, key: str, value: str, lease: int = 0) -> int:
        with self._tx() as db:
            self._expire(db)
            self._check_lease(db, lease)
            return self._change(db, "put", key, value, lease)

    def get(self, key: str) -> Entry | None:
        rows = self._read("SELECT key, value, mod_rev, lease FROM kv WHERE key = ?", (key,))
        return Entry(*rows[0]) if rows else None

    def get_prefix(self, prefix: str) -> list[Entry]:
        rows = self._read(
            "SELECT key, value, mod_rev, lease FROM kv WHERE substr(key, 1, ?) = ? ORDER BY key",
            (len(prefix), prefix),
        )
        return [Entry(*r) for r in rows]

    def delete(self, key: str) -> bool:
        with self._tx() as db:
            self._expire(db)
            if db.execute("SELECT 1 FROM kv WHERE key = ?", (key,)).fetchone() is None:
                return False
            self._change(db, "delete", key, "")
            return True

    def cas(self, key: str, expected: int, value: str, lease: int = 0) -> bool:
        with self._tx() as db:
            self._expire(db)
            self._check_lease(db, lease)
            row = db.execute("SELECT mod_rev FROM kv WHERE key = ?", (key,)).fetchone()
            if (row[0] if row else 0) != expected:
                return False
            self._change(db, "put", key, value, lease)
            return True

    def grant(self, ttl_s: float) -> int:
        if ttl_s <= 0:
            raise RegistryError(f"lease ttl must be > 0, got {ttl_s}")
        with self._tx() as db:
            db.execute("UPDATE meta SET lease_seq = lease_seq + 1 WHERE id = 0")
            lid = db.execute("SELECT lease_seq FROM meta WHERE id = 0").fetchone()[0]
            db.execute("INSERT INTO leases VALUES (?, ?, ?)", (lid, ttl_s, time.time() + ttl_s))
            return lid

    def keepalive(self, lease: int) -> bool:
        with self._tx() as db:
            self._expire(db)
            row = db.execute("SELECT ttl FROM leases WHERE id = ?", (lease,)).fetchone()
            if row is None:
                return False
            db.execute("UPDATE leases SET expires = ? WHERE id = ?", (time.time() + row[0], lease))
            return True

    def revoke(self, lease: int) -> None:
        with self._tx() as db:
            self._drop_lease(db, lease)

    def revision(self) -> int:
        return self._read("SELECT rev FROM meta WHERE id = 0", ())[0][0]

    def events(self, prefix: str, after: int, timeout_s: float) -> tuple[list[Event], int]:
        deadline = time.monotonic() + timeout_s
        while True:
            rev = self._read("SELECT rev FROM meta WHERE id = 0", ())[0][0]
            rows = self._read(
                "SELECT rev, type, key, value FROM events WHERE rev > ? AND rev <= ? ORDER BY rev",
                (after, rev),
            )
            if rows and rows[0][0] != after + 1:
                oldest = self._read("SELECT min(rev) FROM events", ())[0][0]
                if oldest is not None and oldest > after + 1:
                    raise RegistryError(f"revision {after} was pruned (history {self.history})")
            evs = [Event(t, k, v, r) for r, t, k, v in rows if k.startswith(prefix)]
            if evs or time.monotonic() >= deadline:
                return evs, max(after, rev)
            time.sleep(min(self.poll_s, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        with self._lock:
            self._db.close()
