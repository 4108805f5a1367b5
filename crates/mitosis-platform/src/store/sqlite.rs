//! Apps, functions and seed records in an embedded SQLite database (a file, or memory): the
//! store of a platform that runs as one instance.
//!
//! Each record is kept as its JSON with the columns it is looked up by. Queries run on
//! tokio's blocking threads, one at a time (one connection): a slow disk delays the API's
//! store calls, never its runtime threads or calls in flight.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use rusqlite::{Connection, OptionalExtension, params};

use super::{Insert, SeedRecord, TriggerQuery, TriggerWrite};
use crate::error::StoreError;
use crate::model::{App, Func};
use crate::trigger::Trigger;
use crate::workflow::Workflow;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS apps (
    id   TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS fns (
    id     TEXT PRIMARY KEY,
    app_id TEXT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    name   TEXT NOT NULL,
    json   TEXT NOT NULL,
    UNIQUE (app_id, name)
);
CREATE INDEX IF NOT EXISTS fns_by_name ON fns(name);
-- No foreign key: a deleted function's record is taken by whoever drops its seed.
CREATE TABLE IF NOT EXISTS seeds (
    fn_id TEXT PRIMARY KEY,
    json  TEXT NOT NULL
);
-- A trigger goes with its function (and so with its app).
CREATE TABLE IF NOT EXISTS triggers (
    id     TEXT PRIMARY KEY,
    app_id TEXT NOT NULL,
    fn_id  TEXT NOT NULL REFERENCES fns(id) ON DELETE CASCADE,
    name   TEXT NOT NULL,
    type   TEXT NOT NULL,
    source TEXT NOT NULL,
    json   TEXT NOT NULL,
    UNIQUE (app_id, name),
    UNIQUE (app_id, type, source)
);
CREATE INDEX IF NOT EXISTS triggers_by_fn ON triggers(fn_id);
-- A workflow names its stages' functions by id: deleting one fails its next run, not this.
CREATE TABLE IF NOT EXISTS workflows (
    id   TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    json TEXT NOT NULL
);
";

#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    /// The store in the SQLite file at `path` (made if missing).
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        Self::init(Connection::open(path)?)
    }

    /// A store that lives as long as this process.
    pub fn in_memory() -> Result<SqliteStore, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<SqliteStore, StoreError> {
        conn.pragma_update(None, "foreign_keys", true)?;
        // WAL keeps readers of a file store from waiting on a writer's fsync; memory
        // databases answer "memory" and stay as they are.
        let _: String = conn.pragma_update_and_check(None, "journal_mode", "wal", |r| r.get(0))?;
        conn.execute_batch(SCHEMA)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` with the connection on a blocking thread.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            // A panic inside a query leaves SQLite consistent (it rolls back), so a
            // poisoned lock is still usable.
            let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut conn)
        })
        .await
        .map_err(|_| StoreError::Lost)?
    }

    pub async fn insert_app(&self, app: App) -> Result<Insert, StoreError> {
        let json = serde_json::to_string(&app)?;
        self.run(move |c| {
            match c.execute(
                "INSERT INTO apps (id, name, json) VALUES (?1, ?2, ?3)",
                params![app.id, app.name, json],
            ) {
                Ok(_) => Ok(Insert::Done),
                Err(e) if is_unique_violation(&e) => Ok(Insert::NameTaken),
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    pub async fn update_app(&self, app: App) -> Result<bool, StoreError> {
        let json = serde_json::to_string(&app)?;
        self.run(move |c| {
            Ok(c.execute(
                "UPDATE apps SET json = ?2 WHERE id = ?1",
                params![app.id, json],
            )? > 0)
        })
        .await
    }

    pub async fn app(&self, id: String) -> Result<Option<App>, StoreError> {
        self.run(move |c| one(c, "SELECT json FROM apps WHERE id = ?1", &id))
            .await
    }

    /// Apps, by name if `name` is given.
    pub async fn apps(&self, name: Option<String>) -> Result<Vec<App>, StoreError> {
        self.run(move |c| match name {
            Some(n) => many(
                c,
                "SELECT json FROM apps WHERE name = ?1 ORDER BY id",
                &[&n],
            ),
            None => many(c, "SELECT json FROM apps ORDER BY id", &[]),
        })
        .await
    }

    /// Deletes an app and its functions; the ids of the functions that went with it, or
    /// `None` if there was no such app.
    pub async fn delete_app(&self, id: String) -> Result<Option<Vec<String>>, StoreError> {
        self.run(move |c| {
            let tx = c.transaction()?;
            let fns: Vec<String> = {
                let mut q = tx.prepare("SELECT id FROM fns WHERE app_id = ?1")?;
                q.query_map([&id], |r| r.get(0))?
                    .collect::<Result<_, _>>()?
            };
            let deleted = tx.execute("DELETE FROM apps WHERE id = ?1", [&id])?;
            tx.commit()?;
            Ok((deleted > 0).then_some(fns))
        })
        .await
    }

    pub async fn insert_fn(&self, f: Func) -> Result<Insert, StoreError> {
        let json = serde_json::to_string(&f)?;
        self.run(move |c| {
            let app: Option<i64> = c
                .query_row("SELECT 1 FROM apps WHERE id = ?1", [&f.app_id], |r| {
                    r.get(0)
                })
                .optional()?;
            if app.is_none() {
                return Ok(Insert::NoApp);
            }
            match c.execute(
                "INSERT INTO fns (id, app_id, name, json) VALUES (?1, ?2, ?3, ?4)",
                params![f.id, f.app_id, f.name, json],
            ) {
                Ok(_) => Ok(Insert::Done),
                Err(e) if is_unique_violation(&e) => Ok(Insert::NameTaken),
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    pub async fn update_fn(&self, f: Func) -> Result<bool, StoreError> {
        let json = serde_json::to_string(&f)?;
        self.run(move |c| {
            Ok(c.execute(
                "UPDATE fns SET json = ?2 WHERE id = ?1",
                params![f.id, json],
            )? > 0)
        })
        .await
    }

    pub async fn func(&self, id: String) -> Result<Option<Func>, StoreError> {
        self.run(move |c| one(c, "SELECT json FROM fns WHERE id = ?1", &id))
            .await
    }

    /// Functions, of one app and/or by name if given.
    pub async fn fns(
        &self,
        app_id: Option<String>,
        name: Option<String>,
    ) -> Result<Vec<Func>, StoreError> {
        self.run(move |c| match (app_id, name) {
            (Some(a), Some(n)) => many(
                c,
                "SELECT json FROM fns WHERE app_id = ?1 AND name = ?2 ORDER BY id",
                &[&a, &n],
            ),
            (Some(a), None) => many(
                c,
                "SELECT json FROM fns WHERE app_id = ?1 ORDER BY id",
                &[&a],
            ),
            (None, Some(n)) => many(c, "SELECT json FROM fns WHERE name = ?1 ORDER BY id", &[&n]),
            (None, None) => many(c, "SELECT json FROM fns ORDER BY id", &[]),
        })
        .await
    }

    pub async fn delete_fn(&self, id: String) -> Result<bool, StoreError> {
        self.run(move |c| Ok(c.execute("DELETE FROM fns WHERE id = ?1", [&id])? > 0))
            .await
    }

    pub async fn seed(&self, fn_id: String) -> Result<Option<SeedRecord>, StoreError> {
        self.run(move |c| one(c, "SELECT json FROM seeds WHERE fn_id = ?1", &fn_id))
            .await
    }

    /// Records a function's seed; false if the function is gone.
    pub async fn put_seed(&self, seed: SeedRecord) -> Result<bool, StoreError> {
        let json = serde_json::to_string(&seed)?;
        self.run(move |c| {
            let tx = c.transaction()?;
            let exists: Option<i64> = tx
                .query_row("SELECT 1 FROM fns WHERE id = ?1", [&seed.fn_id], |r| {
                    r.get(0)
                })
                .optional()?;
            if exists.is_none() {
                return Ok(false);
            }
            tx.execute(
                "INSERT OR REPLACE INTO seeds (fn_id, json) VALUES (?1, ?2)",
                params![seed.fn_id, json],
            )?;
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    /// Adds a workflow; false if its name is taken.
    pub async fn insert_workflow(&self, wf: Workflow) -> Result<bool, StoreError> {
        let json = serde_json::to_string(&wf)?;
        self.run(move |c| {
            match c.execute(
                "INSERT INTO workflows (id, name, json) VALUES (?1, ?2, ?3)",
                params![wf.id, wf.name, json],
            ) {
                Ok(_) => Ok(true),
                Err(e) if is_unique_violation(&e) => Ok(false),
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    pub async fn workflow(&self, id: String) -> Result<Option<Workflow>, StoreError> {
        self.run(move |c| one(c, "SELECT json FROM workflows WHERE id = ?1", &id))
            .await
    }

    pub async fn workflows(&self) -> Result<Vec<Workflow>, StoreError> {
        self.run(move |c| many(c, "SELECT json FROM workflows ORDER BY id", &[]))
            .await
    }

    pub async fn delete_workflow(&self, id: String) -> Result<bool, StoreError> {
        self.run(move |c| Ok(c.execute("DELETE FROM workflows WHERE id = ?1", [&id])? > 0))
            .await
    }

    /// Adds a trigger, if its function is in its app and its name and route are free there.
    pub async fn insert_trigger(&self, t: Trigger) -> Result<TriggerWrite, StoreError> {
        let json = serde_json::to_string(&t)?;
        self.run(move |c| {
            let tx = c.transaction()?;
            let fn_app: Option<String> = tx
                .query_row("SELECT app_id FROM fns WHERE id = ?1", [&t.fn_id], |r| {
                    r.get(0)
                })
                .optional()?;
            if fn_app.as_deref() != Some(t.app_id.as_str()) {
                return Ok(TriggerWrite::NoFn);
            }
            let done = tx.execute(
                "INSERT INTO triggers (id, app_id, fn_id, name, type, source, json)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![t.id, t.app_id, t.fn_id, t.name, t.kind, t.source, json],
            );
            let written = trigger_written(done)?;
            tx.commit()?;
            Ok(written)
        })
        .await
    }

    /// Rewrites a trigger (its route may move, if the new one is free).
    pub async fn update_trigger(&self, t: Trigger) -> Result<TriggerWrite, StoreError> {
        let json = serde_json::to_string(&t)?;
        self.run(move |c| {
            let done = c.execute(
                "UPDATE triggers SET source = ?2, json = ?3 WHERE id = ?1",
                params![t.id, t.source, json],
            );
            Ok(match trigger_written(done)? {
                TriggerWrite::Done if c.changes() == 0 => TriggerWrite::NoFn,
                other => other,
            })
        })
        .await
    }

    pub async fn trigger(&self, id: String) -> Result<Option<Trigger>, StoreError> {
        self.run(move |c| one(c, "SELECT json FROM triggers WHERE id = ?1", &id))
            .await
    }

    /// Triggers matching `q`, in name order (Fn's).
    pub async fn triggers(&self, q: TriggerQuery) -> Result<Vec<Trigger>, StoreError> {
        self.run(move |c| {
            let all: Vec<Trigger> = match &q.app_id {
                Some(app) => many(
                    c,
                    "SELECT json FROM triggers WHERE app_id = ?1 ORDER BY name",
                    &[app],
                )?,
                None => many(c, "SELECT json FROM triggers ORDER BY name", &[])?,
            };
            Ok(all.into_iter().filter(|t| q.matches(t)).collect())
        })
        .await
    }

    pub async fn delete_trigger(&self, id: String) -> Result<bool, StoreError> {
        self.run(move |c| Ok(c.execute("DELETE FROM triggers WHERE id = ?1", [&id])? > 0))
            .await
    }

    /// Forgets a function's seed record; the record it was.
    pub async fn take_seed(&self, fn_id: String) -> Result<Option<SeedRecord>, StoreError> {
        self.run(move |c| {
            let tx = c.transaction()?;
            let seed = one(&tx, "SELECT json FROM seeds WHERE fn_id = ?1", &fn_id)?;
            tx.execute("DELETE FROM seeds WHERE fn_id = ?1", [&fn_id])?;
            tx.commit()?;
            Ok(seed)
        })
        .await
    }
}

fn one<T: serde::de::DeserializeOwned>(
    c: &Connection,
    sql: &str,
    id: &str,
) -> Result<Option<T>, StoreError> {
    let json: Option<String> = c.query_row(sql, [id], |r| r.get(0)).optional()?;
    Ok(json.map(|j| serde_json::from_str(&j)).transpose()?)
}

fn many<T: serde::de::DeserializeOwned>(
    c: &Connection,
    sql: &str,
    args: &[&String],
) -> Result<Vec<T>, StoreError> {
    let mut q = c.prepare(sql)?;
    let rows = q.query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for json in rows {
        out.push(serde_json::from_str(&json?)?);
    }
    Ok(out)
}

/// A trigger's write, or which of its app's unique names it ran into.
fn trigger_written(done: rusqlite::Result<usize>) -> Result<TriggerWrite, StoreError> {
    match done {
        Ok(_) => Ok(TriggerWrite::Done),
        Err(e) if is_unique_violation(&e) => Ok(if e.to_string().contains("triggers.name") {
            TriggerWrite::NameTaken
        } else {
            TriggerWrite::SourceTaken
        }),
        Err(e) => Err(e.into()),
    }
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
    )
}
