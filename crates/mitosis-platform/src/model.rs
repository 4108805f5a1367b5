//! Apps and functions with Fn's fields and JSON shapes, and the checks Fn makes on them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ApiError;
use crate::ids;

/// Fn's defaults (MiB and seconds), and its bounds on a synchronous call.
pub const DEFAULT_MEMORY: u64 = 128;
pub const DEFAULT_TIMEOUT: u32 = 30;
pub const DEFAULT_IDLE_TIMEOUT: u32 = 30;
pub const MAX_TIMEOUT: u32 = 300;
pub const MAX_IDLE_TIMEOUT: u32 = 3600;
const MAX_NAME: usize = 255;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct App {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syslog_url: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Func {
    pub id: String,
    pub name: String,
    pub app_id: String,
    /// The OCI bundle directory of the function (the same path on every host).
    pub image: String,
    /// MiB. Stored and reported; the limit a child runs under is its bundle's (config.json).
    pub memory: u64,
    /// Seconds a call may run before it is killed (504).
    pub timeout: u32,
    /// Seconds; kept for Fn's keep-warm policy, unused by remote fork per call.
    pub idle_timeout: u32,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, Value>,
    pub created_at: String,
    pub updated_at: String,
}

/// The body of `POST /v2/apps` and `PUT /v2/apps/{id}`: every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct AppInput {
    pub id: Option<String>,
    pub name: Option<String>,
    pub config: Option<BTreeMap<String, String>>,
    pub annotations: Option<BTreeMap<String, Value>>,
    pub syslog_url: Option<String>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
}

/// The body of `POST /v2/fns` and `PUT /v2/fns/{id}`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct FuncInput {
    pub id: Option<String>,
    pub name: Option<String>,
    pub app_id: Option<String>,
    pub image: Option<String>,
    pub memory: Option<u64>,
    pub timeout: Option<u32>,
    pub idle_timeout: Option<u32>,
    pub config: Option<BTreeMap<String, String>>,
    pub annotations: Option<BTreeMap<String, Value>>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
}

/// Fn's list shape.
#[derive(Debug, Serialize, Deserialize)]
pub struct List<T> {
    pub items: Vec<T>,
    pub next_cursor: String,
}

pub(crate) fn check_name(name: &str, what: &str) -> Result<(), ApiError> {
    if name.is_empty() {
        return Err(ApiError::bad_request(format!("Missing {what} name")));
    }
    if name.len() > MAX_NAME {
        return Err(ApiError::bad_request(format!(
            "{what} name must be {MAX_NAME} characters or less"
        )));
    }
    if !name
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
    {
        return Err(ApiError::bad_request(format!(
            "Invalid {what} name: only letters, digits, '_' and '-'"
        )));
    }
    Ok(())
}

/// Fn refuses ids and timestamps in a create: the server sets them.
pub(crate) fn no_server_fields(
    id: &Option<String>,
    c: &Option<String>,
    u: &Option<String>,
) -> Result<(), ApiError> {
    if id.is_some() {
        return Err(ApiError::bad_request("ID cannot be provided for create"));
    }
    if c.is_some() || u.is_some() {
        return Err(ApiError::bad_request(
            "created_at and updated_at cannot be provided",
        ));
    }
    Ok(())
}

/// A config merge as Fn does it: a key with an empty value is removed.
fn merge_config(into: &mut BTreeMap<String, String>, from: BTreeMap<String, String>) {
    for (k, v) in from {
        if v.is_empty() {
            into.remove(&k);
        } else {
            into.insert(k, v);
        }
    }
}

/// An annotation merge: a key whose value is null or "" is removed.
pub(crate) fn merge_annotations(into: &mut BTreeMap<String, Value>, from: BTreeMap<String, Value>) {
    for (k, v) in from {
        if v.is_null() || v.as_str() == Some("") {
            into.remove(&k);
        } else {
            into.insert(k, v);
        }
    }
}

impl App {
    pub fn create(input: AppInput) -> Result<App, ApiError> {
        no_server_fields(&input.id, &input.created_at, &input.updated_at)?;
        let name = input.name.unwrap_or_default();
        check_name(&name, "app")?;
        let now = ids::now_rfc3339();
        let mut app = App {
            id: ids::ulid(),
            name,
            config: BTreeMap::new(),
            annotations: BTreeMap::new(),
            syslog_url: input.syslog_url,
            created_at: now.clone(),
            updated_at: now,
        };
        merge_config(&mut app.config, input.config.unwrap_or_default());
        merge_annotations(&mut app.annotations, input.annotations.unwrap_or_default());
        Ok(app)
    }

    pub fn update(&mut self, input: AppInput) -> Result<(), ApiError> {
        if input.id.as_ref().is_some_and(|id| *id != self.id) {
            return Err(ApiError::bad_request(
                "App ID in path does not match ID in body",
            ));
        }
        if input.name.as_ref().is_some_and(|n| *n != self.name) {
            return Err(ApiError::conflict("App name cannot be changed"));
        }
        merge_config(&mut self.config, input.config.unwrap_or_default());
        merge_annotations(&mut self.annotations, input.annotations.unwrap_or_default());
        if input.syslog_url.is_some() {
            self.syslog_url = input.syslog_url.filter(|s| !s.is_empty());
        }
        self.updated_at = ids::now_rfc3339();
        Ok(())
    }
}

impl Func {
    pub fn create(input: FuncInput) -> Result<Func, ApiError> {
        no_server_fields(&input.id, &input.created_at, &input.updated_at)?;
        let name = input.name.unwrap_or_default();
        check_name(&name, "fn")?;
        let app_id = input
            .app_id
            .filter(|a| !a.is_empty())
            .ok_or_else(|| ApiError::bad_request("Missing app ID"))?;
        let image = input
            .image
            .filter(|i| !i.is_empty())
            .ok_or_else(|| ApiError::bad_request("Missing image"))?;
        let now = ids::now_rfc3339();
        let mut f = Func {
            id: ids::ulid(),
            name,
            app_id,
            image,
            memory: input.memory.unwrap_or(DEFAULT_MEMORY),
            timeout: input.timeout.unwrap_or(DEFAULT_TIMEOUT),
            idle_timeout: input.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT),
            config: BTreeMap::new(),
            annotations: BTreeMap::new(),
            created_at: now.clone(),
            updated_at: now,
        };
        merge_config(&mut f.config, input.config.unwrap_or_default());
        merge_annotations(&mut f.annotations, input.annotations.unwrap_or_default());
        f.check()?;
        Ok(f)
    }

    pub fn update(&mut self, input: FuncInput) -> Result<(), ApiError> {
        if input.id.as_ref().is_some_and(|id| *id != self.id) {
            return Err(ApiError::bad_request(
                "Fn ID in path does not match ID in body",
            ));
        }
        if input.app_id.as_ref().is_some_and(|a| *a != self.app_id) {
            return Err(ApiError::conflict("App ID cannot be changed"));
        }
        if input.name.as_ref().is_some_and(|n| *n != self.name) {
            return Err(ApiError::conflict("Fn name cannot be changed"));
        }
        if let Some(image) = input.image.filter(|i| !i.is_empty()) {
            self.image = image;
        }
        self.memory = input.memory.unwrap_or(self.memory);
        self.timeout = input.timeout.unwrap_or(self.timeout);
        self.idle_timeout = input.idle_timeout.unwrap_or(self.idle_timeout);
        merge_config(&mut self.config, input.config.unwrap_or_default());
        merge_annotations(&mut self.annotations, input.annotations.unwrap_or_default());
        self.check()?;
        self.updated_at = ids::now_rfc3339();
        Ok(())
    }

    fn check(&self) -> Result<(), ApiError> {
        if let Some(v) = self.annotations.get(crate::policy::POLICY_ANNOTATION) {
            let named = v.as_str().map(str::parse::<crate::policy::Strategy>);
            match named {
                Some(Ok(_)) => {}
                Some(Err(why)) => {
                    return Err(ApiError::bad_request(format!(
                        "annotation {}: {why}",
                        crate::policy::POLICY_ANNOTATION
                    )));
                }
                None => {
                    return Err(ApiError::bad_request(format!(
                        "annotation {}: a string",
                        crate::policy::POLICY_ANNOTATION
                    )));
                }
            }
        }
        match self
            .annotations
            .get(crate::http_contract::CONTRACT_ANNOTATION)
            .map(|v| v.as_str())
        {
            None | Some(Some("stdio" | "http")) => {}
            Some(_) => {
                return Err(ApiError::bad_request(format!(
                    "annotation {}: \"stdio\" or \"http\"",
                    crate::http_contract::CONTRACT_ANNOTATION
                )));
            }
        }
        if !(1..=MAX_TIMEOUT).contains(&self.timeout) {
            return Err(ApiError::bad_request(format!(
                "timeout value is out of range, must be between 1 and {MAX_TIMEOUT}"
            )));
        }
        if !(1..=MAX_IDLE_TIMEOUT).contains(&self.idle_timeout) {
            return Err(ApiError::bad_request(format!(
                "idle_timeout value is out of range, must be between 1 and {MAX_IDLE_TIMEOUT}"
            )));
        }
        if self.memory == 0 {
            return Err(ApiError::bad_request(
                "memory value is invalid, 0 was given",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn input<T: serde::de::DeserializeOwned>(v: Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_function_gets_fn_defaults_and_merges_like_fn() {
        let mut f = Func::create(input(json!({
            "name": "img", "app_id": "A", "image": "/b", "config": {"K": "v", "E": ""}
        })))
        .unwrap();
        assert_eq!((f.memory, f.timeout, f.idle_timeout), (128, 30, 30));
        assert_eq!(f.config.len(), 1);
        f.update(input(json!({"timeout": 5, "config": {"K": "", "L": "w"}})))
            .unwrap();
        assert_eq!(f.timeout, 5);
        assert_eq!(f.config.keys().collect::<Vec<_>>(), ["L"]);
        let e = f.update(input(json!({"name": "other"}))).unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::CONFLICT);
        let e = f.update(input(json!({"timeout": 0}))).unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
    }

    #[test]
    fn creates_refuse_what_fn_refuses() {
        for body in [
            json!({"app_id": "A", "image": "/b"}),
            json!({"name": "x y", "app_id": "A", "image": "/b"}),
            json!({"name": "x", "image": "/b"}),
            json!({"name": "x", "app_id": "A"}),
            json!({"id": "1", "name": "x", "app_id": "A", "image": "/b"}),
        ] {
            let e = Func::create(input(body.clone())).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{body}");
        }
        assert!(App::create(input(json!({"name": ""}))).is_err());
        let app = App::create(input(json!({"name": "a_b-1"}))).unwrap();
        assert_eq!(app.id.len(), 26);
    }
}
