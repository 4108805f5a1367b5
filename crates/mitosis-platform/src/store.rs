//! Apps and functions in an embedded SQLite database (a file, or memory).
//!
//! Each record is kept as its JSON with the columns it is looked up by. Queries run on
//! tokio's blocking threads, one at a time (one connection): a slow disk delays the API's
//! store calls, never its runtime threads or calls in flight.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use rusqlite::{Connection, OptionalExtension, params};

use crate::error::StoreError;
use crate::model::{App, Func};

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
";

/// What an insert can run into besides the store failing.
#[derive(Debug, PartialEq, Eq)]
pub enum Insert {
    Done,
    /// The name is taken (in its app, for a function).
    NameTaken,
    /// A function's app does not exist.
    NoApp,
}

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl Store {
    /// The store in the SQLite file at `path` (made if missing).
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Self::init(Connection::open(path)?)
    }

    /// A store that lives as long as this process.
    pub fn in_memory() -> Result<Store, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Store, StoreError> {
        conn.pragma_update(None, "foreign_keys", true)?;
        // WAL keeps readers of a file store from waiting on a writer's fsync; memory
        // databases answer "memory" and stay as they are.
        let _: String = conn.pragma_update_and_check(None, "journal_mode", "wal", |r| r.get(0))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store {
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

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AppInput, FuncInput};

    fn app(name: &str) -> App {
        App::create(AppInput {
            name: Some(name.into()),
            ..AppInput::default()
        })
        .unwrap()
    }

    fn func(app_id: &str, name: &str) -> Func {
        Func::create(FuncInput {
            name: Some(name.into()),
            app_id: Some(app_id.into()),
            image: Some("/bundle".into()),
            ..FuncInput::default()
        })
        .unwrap()
    }

    #[tokio::test]
    async fn apps_and_functions_round_trip_in_a_file_and_cascade() {
        let dir =
            std::env::temp_dir().join(format!("mitosis-platform-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("store.db");
        let _ = std::fs::remove_file(&path);
        let store = Store::open(&path).unwrap();
        let a = app("a");
        assert_eq!(store.insert_app(a.clone()).await.unwrap(), Insert::Done);
        assert_eq!(store.insert_app(app("a")).await.unwrap(), Insert::NameTaken);
        let f = func(&a.id, "f");
        assert_eq!(store.insert_fn(f.clone()).await.unwrap(), Insert::Done);
        assert_eq!(
            store.insert_fn(func(&a.id, "f")).await.unwrap(),
            Insert::NameTaken
        );
        assert_eq!(
            store.insert_fn(func("nope", "g")).await.unwrap(),
            Insert::NoApp
        );
        drop(store);

        // Reopened: the records are still there.
        let store = Store::open(&path).unwrap();
        assert_eq!(store.func(f.id.clone()).await.unwrap(), Some(f.clone()));
        assert_eq!(
            store.fns(Some(a.id.clone()), None).await.unwrap(),
            vec![f.clone()]
        );
        assert_eq!(store.fns(None, Some("f".into())).await.unwrap().len(), 1);
        assert_eq!(store.apps(Some("a".into())).await.unwrap(), vec![a.clone()]);
        assert_eq!(
            store.delete_app(a.id.clone()).await.unwrap(),
            Some(vec![f.id.clone()])
        );
        assert_eq!(store.func(f.id).await.unwrap(), None);
        assert_eq!(store.delete_app(a.id).await.unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
