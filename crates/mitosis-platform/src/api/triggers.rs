//! Fn's triggers: `/v2/triggers` (their records) and `/t/{app}{source}` (a call through one,
//! any method, the function's answer as `/invoke`'s).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};

use super::{ApiResult, Page, Shared, Target, base_url, body, call, find_app, find_fn, ok};
use crate::Platform;
use crate::error::ApiError;
use crate::model::List;
use crate::store::{TriggerQuery, TriggerWrite};
use crate::trigger::{self, Trigger, TriggerInput};

pub fn routes() -> Router<Arc<Platform>> {
    Router::new()
        .route("/v2/triggers", get(list).post(create))
        .route(
            "/v2/triggers/{trigger_id}",
            get(get_one).put(update).delete(delete),
        )
        .route("/t/{app_name}", any(call_root))
        .route("/t/{app_name}/{*source}", any(call_source))
}

/// The store's answer to a write, as Fn answers it.
async fn written(p: &Platform, t: &Trigger, w: TriggerWrite) -> ApiResult<()> {
    match w {
        TriggerWrite::Done => Ok(()),
        TriggerWrite::NameTaken => Err(ApiError::conflict("Trigger already exists")),
        TriggerWrite::SourceTaken => Err(ApiError::conflict(
            "Trigger with the same type and source exists",
        )),
        TriggerWrite::NoFn => match p.store.func(t.fn_id.clone()).await? {
            Some(f) if f.app_id != t.app_id => Err(ApiError::bad_request(
                "Trigger's fn_id is a function of another app",
            )),
            _ => Err(ApiError::not_found("Fn not found")),
        },
    }
}

/// `t` with its endpoint, under its app's name.
async fn shown(p: &Platform, headers: &HeaderMap, t: Trigger) -> ApiResult<Trigger> {
    let app = find_app(p, t.app_id.clone()).await?;
    Ok(t.shown(base_url(headers).as_deref(), &app.name))
}

async fn list(
    State(p): Shared,
    headers: HeaderMap,
    Query(q): Query<TriggerQuery>,
    Query(page): Query<Page>,
) -> ApiResult<Response> {
    let base = base_url(&headers);
    let mut names: HashMap<String, String> = HashMap::new();
    let List {
        items: on_page,
        next_cursor,
    } = page.of(p.store.triggers(q).await?, |t| (&t.name, &t.id))?;
    let mut items = Vec::new();
    for t in on_page {
        if !names.contains_key(&t.app_id) {
            let app = p.store.app(t.app_id.clone()).await?;
            names.insert(t.app_id.clone(), app.map(|a| a.name).unwrap_or_default());
        }
        let app_name = &names[&t.app_id];
        items.push(t.shown(base.as_deref(), app_name));
    }
    Ok(ok(&List { items, next_cursor }))
}

async fn create(State(p): Shared, headers: HeaderMap, bytes: Bytes) -> ApiResult<Response> {
    let t = Trigger::create(body::<TriggerInput>(&bytes)?)?;
    find_app(&p, t.app_id.clone()).await?;
    let w = p.store.insert_trigger(t.clone()).await?;
    written(&p, &t, w).await?;
    Ok(ok(&shown(&p, &headers, t).await?))
}

async fn find(p: &Platform, id: String) -> ApiResult<Trigger> {
    p.store
        .trigger(id)
        .await?
        .ok_or_else(|| ApiError::not_found("Trigger not found"))
}

async fn get_one(
    State(p): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let t = find(&p, id).await?;
    Ok(ok(&shown(&p, &headers, t).await?))
}

async fn update(
    State(p): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let input = body::<TriggerInput>(&bytes)?;
    let mut t = find(&p, id).await?;
    t.update(input)?;
    match p.store.update_trigger(t.clone()).await? {
        TriggerWrite::NoFn => return Err(ApiError::not_found("Trigger not found")),
        w => written(&p, &t, w).await?,
    }
    Ok(ok(&shown(&p, &headers, t).await?))
}

async fn delete(State(p): Shared, Path(id): Path<String>) -> ApiResult<Response> {
    if !p.store.delete_trigger(id).await? {
        return Err(ApiError::not_found("Trigger not found"));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn call_root(
    State(p): Shared,
    Path(app_name): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    request: Body,
) -> ApiResult<Response> {
    through(p, app_name, "/".into(), method, uri, headers, request).await
}

async fn call_source(
    State(p): Shared,
    Path((app_name, source)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    request: Body,
) -> ApiResult<Response> {
    let source = format!("/{}", source.trim_end_matches('/'));
    through(p, app_name, source, method, uri, headers, request).await
}

/// A call through the HTTP trigger of `app_name` at `source`: an HTTP function is asked with
/// the caller's method, the trigger's path and the query.
async fn through(
    p: Arc<Platform>,
    app_name: String,
    source: String,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    request: Body,
) -> ApiResult<Response> {
    let app = p
        .store
        .apps(Some(app_name))
        .await?
        .pop()
        .ok_or_else(|| ApiError::not_found("App not found"))?;
    let q = TriggerQuery {
        app_id: Some(app.id),
        kind: Some(trigger::HTTP.into()),
        source: Some(source.clone()),
        ..TriggerQuery::default()
    };
    let t = p
        .store
        .triggers(q)
        .await?
        .pop()
        .ok_or_else(|| ApiError::not_found("Trigger not found"))?;
    let f = find_fn(&p, t.fn_id).await?;
    let target = Target {
        method,
        path: source,
        query: uri.query().map(str::to_owned),
    };
    call(&p, &f, &target, &headers, request).await
}
