//! Fn's triggers: a named HTTP route (`source`, a path) of an app to one of its functions,
//! called at `/t/{app name}{source}` with any method.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ApiError;
use crate::ids;
use crate::model::{check_name, merge_annotations, no_server_fields};

/// The only kind of trigger Fn's server runs.
pub const HTTP: &str = "http";

/// Fn's annotation telling a client where a trigger is called: made per answer, never stored.
pub const HTTP_ENDPOINT: &str = "fnproject.io/trigger/httpEndpoint";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trigger {
    pub id: String,
    pub name: String,
    pub app_id: String,
    pub fn_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The route's path within its app, from `/`.
    pub source: String,
    #[serde(default)]
    pub annotations: BTreeMap<String, Value>,
    pub created_at: String,
    pub updated_at: String,
}

/// The body of `POST /v2/triggers` and `PUT /v2/triggers/{id}`: every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct TriggerInput {
    pub id: Option<String>,
    pub name: Option<String>,
    pub app_id: Option<String>,
    pub fn_id: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub source: Option<String>,
    pub annotations: Option<BTreeMap<String, Value>>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
}

/// A source as Fn keeps it: a path from `/`, without a trailing one, of printable
/// characters.
fn check_source(source: &str) -> Result<(), ApiError> {
    if source.is_empty() {
        return Err(ApiError::bad_request("Missing Trigger Source"));
    }
    if !source.starts_with('/') {
        return Err(ApiError::bad_request("Missing Trigger Source Prefix '/'"));
    }
    if source.len() > 2048 || source.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(ApiError::bad_request("Invalid Trigger Source"));
    }
    Ok(())
}

fn required(value: Option<String>, what: &str) -> Result<String, ApiError> {
    value
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApiError::bad_request(format!("Missing {what} on Trigger")))
}

impl Trigger {
    /// A new trigger from a create's body; its app and function are checked by the store.
    pub fn create(input: TriggerInput) -> Result<Trigger, ApiError> {
        no_server_fields(&input.id, &input.created_at, &input.updated_at)?;
        let name = input.name.unwrap_or_default();
        check_name(&name, "trigger")?;
        let app_id = required(input.app_id, "app ID")?;
        let fn_id = required(input.fn_id, "Fn ID")?;
        let kind = required(input.kind, "type")?;
        if kind != HTTP {
            return Err(ApiError::bad_request("Trigger Type Not Supported"));
        }
        let source = input.source.unwrap_or_default();
        check_source(&source)?;
        let now = ids::now_rfc3339();
        let mut t = Trigger {
            id: ids::ulid(),
            name,
            app_id,
            fn_id,
            kind,
            source: source.trim_end_matches('/').to_owned(),
            annotations: BTreeMap::new(),
            created_at: now.clone(),
            updated_at: now,
        };
        if t.source.is_empty() {
            t.source = "/".into();
        }
        merge_annotations(&mut t.annotations, input.annotations.unwrap_or_default());
        t.annotations.remove(HTTP_ENDPOINT);
        Ok(t)
    }

    /// Applies an update's body: its source and annotations may change, not what it is.
    pub fn update(&mut self, input: TriggerInput) -> Result<(), ApiError> {
        if input.id.as_ref().is_some_and(|id| *id != self.id) {
            return Err(ApiError::bad_request(
                "Trigger ID in path does not match ID in body",
            ));
        }
        let fixed = [
            ("name", &input.name, &self.name),
            ("app_id", &input.app_id, &self.app_id),
            ("fn_id", &input.fn_id, &self.fn_id),
            ("type", &input.kind, &self.kind),
        ];
        if let Some((field, ..)) = fixed
            .iter()
            .find(|(_, new, old)| new.as_ref().is_some_and(|n| n != *old))
        {
            return Err(ApiError::conflict(format!(
                "Trigger {field} cannot be changed"
            )));
        }
        if let Some(source) = input.source {
            check_source(&source)?;
            let trimmed = source.trim_end_matches('/');
            self.source = if trimmed.is_empty() { "/" } else { trimmed }.to_owned();
        }
        let mut annotations = input.annotations.unwrap_or_default();
        annotations.remove(HTTP_ENDPOINT);
        merge_annotations(&mut self.annotations, annotations);
        self.updated_at = ids::now_rfc3339();
        Ok(())
    }

    /// `self` as an answer shows it: with its endpoint when the platform's address is known.
    pub fn shown(mut self, base: Option<&str>, app_name: &str) -> Trigger {
        if let Some(base) = base {
            let url = format!("{base}/t/{app_name}{}", self.source);
            self.annotations
                .insert(HTTP_ENDPOINT.into(), Value::String(url));
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(json: Value) -> TriggerInput {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_trigger_needs_a_name_app_fn_http_type_and_a_path() {
        let ok = serde_json::json!({"name": "hello", "app_id": "A", "fn_id": "F",
                                    "type": "http", "source": "/say/hello/"});
        let t = Trigger::create(input(ok.clone())).unwrap();
        assert_eq!((t.source.as_str(), t.kind.as_str()), ("/say/hello", "http"));
        assert_eq!(t.id.len(), 26);
        for (field, value, want) in [
            ("name", Value::Null, "Missing trigger name"),
            ("app_id", Value::Null, "Missing app ID"),
            ("fn_id", "".into(), "Missing Fn ID"),
            ("type", "schedule".into(), "Trigger Type Not Supported"),
            ("source", "hello".into(), "Prefix '/'"),
            ("source", "/a b".into(), "Invalid Trigger Source"),
            ("id", "X".into(), "ID cannot be provided"),
        ] {
            let mut body = ok.clone();
            body[field] = value;
            let err = Trigger::create(input(body)).unwrap_err().message;
            assert!(err.contains(want), "{field}: {err:?} should say {want:?}");
        }
    }

    #[test]
    fn an_update_moves_the_source_and_merges_annotations_but_keeps_what_it_is() {
        let mut t = Trigger::create(input(serde_json::json!({"name": "t", "app_id": "A",
            "fn_id": "F", "type": "http", "source": "/a", "annotations": {"k": "v"}})))
        .unwrap();
        t.update(input(
            serde_json::json!({"source": "/b", "annotations": {"k": "", "n": 1}}),
        ))
        .unwrap();
        assert_eq!(t.source, "/b");
        assert_eq!(t.annotations, BTreeMap::from([("n".into(), 1.into())]));
        let moved = t.update(input(serde_json::json!({"fn_id": "G"})));
        assert!(
            moved
                .unwrap_err()
                .message
                .contains("fn_id cannot be changed")
        );
        let shown = t.clone().shown(Some("http://h:8080"), "shop");
        assert_eq!(shown.annotations[HTTP_ENDPOINT], "http://h:8080/t/shop/b");
    }
}
