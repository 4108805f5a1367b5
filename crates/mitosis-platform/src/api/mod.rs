//! The HTTP API: Fn's v2 (apps, functions, triggers, `/invoke/{fn_id}`, `/t/{app}{source}`)
//! and OpenFaaS's `/function/{name}`, with Fn's JSON shapes and error bodies.

mod page;
mod triggers;

use page::Page;

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::error::ApiError;
use crate::http_contract::{self, HttpRequest};
use crate::metrics::{self, CallLabels, FnLabels};
use crate::model::{App, AppInput, Func, FuncInput, List};
use crate::store::Insert;
use crate::{Invoked, Platform};

type Shared = State<Arc<Platform>>;
type ApiResult<T> = Result<T, ApiError>;

pub fn router(platform: Arc<Platform>) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/v2/apps", get(list_apps).post(create_app))
        .route(
            "/v2/apps/{app_id}",
            get(get_app).put(update_app).delete(delete_app),
        )
        .route("/v2/fns", get(list_fns).post(create_fn))
        .route(
            "/v2/fns/{fn_id}",
            get(get_fn).put(update_fn).delete(delete_fn),
        )
        .route("/invoke/{fn_id}", post(invoke))
        .route("/v2/workflows", get(list_workflows).post(create_workflow))
        .route(
            "/v2/workflows/{workflow_id}",
            get(get_workflow).delete(delete_workflow),
        )
        .route("/invoke-workflow/{workflow_id}", post(invoke_workflow))
        // OpenFaaS's gateway passes any method and sub-path on to the function.
        .route("/function/{name}", any(invoke_by_name))
        .route("/function/{name}/{*rest}", any(invoke_by_name_path))
        .route("/mitosis/hosts", get(hosts))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(triggers::routes())
        .merge(crate::dashboard::router())
        .fallback(|| async { ApiError::not_found("Path not found") })
        .with_state(platform)
}

async fn root() -> Response {
    axum::Json(json!({"hello": "world!", "goto": "mitosis-platform: Fn v2 on remote fork"}))
        .into_response()
}

/// A JSON body, refused as Fn does (400 with a message) when it does not parse.
fn body<T: DeserializeOwned>(bytes: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad_request(format!("Invalid JSON: {e}")))
}

fn ok<T: serde::Serialize>(value: &T) -> Response {
    axum::Json(value).into_response()
}

#[derive(Deserialize)]
struct AppQuery {
    name: Option<String>,
}

async fn list_apps(
    State(p): Shared,
    Query(q): Query<AppQuery>,
    Query(page): Query<Page>,
) -> ApiResult<Response> {
    let items = p.store.apps(q.name).await?;
    Ok(ok(&page.of(items, |a| (&a.name, &a.id))?))
}

async fn create_app(State(p): Shared, bytes: Bytes) -> ApiResult<Response> {
    let app = App::create(body::<AppInput>(&bytes)?)?;
    match p.store.insert_app(app.clone()).await? {
        Insert::Done => Ok(ok(&app)),
        _ => Err(ApiError::conflict("App with specified name already exists")),
    }
}

async fn find_app(p: &Platform, id: String) -> ApiResult<App> {
    p.store
        .app(id)
        .await?
        .ok_or_else(|| ApiError::not_found("App not found"))
}

async fn get_app(State(p): Shared, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(ok(&find_app(&p, id).await?))
}

async fn update_app(State(p): Shared, Path(id): Path<String>, bytes: Bytes) -> ApiResult<Response> {
    let input = body::<AppInput>(&bytes)?;
    let mut app = find_app(&p, id).await?;
    app.update(input)?;
    if !p.store.update_app(app.clone()).await? {
        return Err(ApiError::not_found("App not found"));
    }
    Ok(ok(&app))
}

async fn delete_app(State(p): Shared, Path(id): Path<String>) -> ApiResult<Response> {
    let fns = p
        .store
        .delete_app(id)
        .await?
        .ok_or_else(|| ApiError::not_found("App not found"))?;
    for fn_id in fns {
        forget_seed(&p, fn_id);
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct FnQuery {
    app_id: Option<String>,
    name: Option<String>,
}

/// Fn's annotation that tells a client (the `fn` CLI's `fn invoke`) where to call a
/// function: made from the request's `Host` for each answer, as Fn's server does, never
/// stored.
pub const INVOKE_ENDPOINT: &str = "fnproject.io/fn/invokeEndpoint";

/// The platform's address as the caller reached it, if it said (`Host`).
fn base_url(headers: &HeaderMap) -> Option<String> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    Some(format!("http://{host}"))
}

/// `f` as an answer shows it: with its invoke endpoint when the caller's `Host` is known.
fn shown(mut f: Func, base: Option<&str>) -> Func {
    if let Some(base) = base {
        let url = format!("{base}/invoke/{}", f.id);
        f.annotations.insert(INVOKE_ENDPOINT.into(), json!(url));
    }
    f
}

async fn list_fns(
    State(p): Shared,
    headers: HeaderMap,
    Query(q): Query<FnQuery>,
    Query(page): Query<Page>,
) -> ApiResult<Response> {
    let base = base_url(&headers);
    let items = p.store.fns(q.app_id, q.name).await?;
    let mut list = page.of(items, |f| (&f.name, &f.id))?;
    list.items = list
        .items
        .into_iter()
        .map(|f| shown(f, base.as_deref()))
        .collect();
    Ok(ok(&list))
}

async fn create_fn(State(p): Shared, headers: HeaderMap, bytes: Bytes) -> ApiResult<Response> {
    let f = Func::create(body::<FuncInput>(&bytes)?)?;
    match p.store.insert_fn(f.clone()).await? {
        Insert::Done => {
            // Seeds are made now, in the background: the first call finds them warm.
            p.deployed(&f);
            Ok(ok(&shown(f, base_url(&headers).as_deref())))
        }
        Insert::NoApp => Err(ApiError::not_found("App not found")),
        Insert::NameTaken => Err(ApiError::conflict(
            "Fn with specified name already exists in the app",
        )),
    }
}

async fn find_fn(p: &Platform, id: String) -> ApiResult<Func> {
    p.store
        .func(id)
        .await?
        .ok_or_else(|| ApiError::not_found("Fn not found"))
}

async fn get_fn(
    State(p): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let f = find_fn(&p, id).await?;
    Ok(ok(&shown(f, base_url(&headers).as_deref())))
}

async fn update_fn(
    State(p): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let mut input = body::<FuncInput>(&bytes)?;
    // A client that sends back what it read does not store the endpoint.
    if let Some(a) = input.annotations.as_mut() {
        a.remove(INVOKE_ENDPOINT);
    }
    let mut f = find_fn(&p, id).await?;
    let image = f.image.clone();
    f.update(input)?;
    if !p.store.update_fn(f.clone()).await? {
        return Err(ApiError::not_found("Fn not found"));
    }
    if f.image != image {
        // The old seed is replaced by the first `get` that sees the new image.
        p.deployed(&f);
    }
    Ok(ok(&shown(f, base_url(&headers).as_deref())))
}

async fn delete_fn(State(p): Shared, Path(id): Path<String>) -> ApiResult<Response> {
    if !p.store.delete_fn(id.clone()).await? {
        return Err(ApiError::not_found("Fn not found"));
    }
    forget_seed(&p, id);
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Drops a deleted function's seed, without making the API wait on its host.
fn forget_seed(p: &Arc<Platform>, fn_id: String) {
    let p = p.clone();
    tokio::spawn(async move { p.removed(&fn_id).await });
}

async fn create_workflow(State(p): Shared, bytes: Bytes) -> ApiResult<Response> {
    let input = body::<crate::workflow::WorkflowInput>(&bytes)?;
    let (name, mut stages) = crate::workflow::check(input)?;
    crate::workflow::resolve(&p.store, &mut stages).await?;
    let wf = crate::workflow::Workflow {
        id: crate::ids::ulid(),
        name,
        stages,
        created_at: crate::ids::now_rfc3339(),
    };
    if !p.store.insert_workflow(wf.clone()).await? {
        return Err(ApiError::conflict(
            "Workflow with specified name already exists",
        ));
    }
    Ok(ok(&wf))
}

async fn list_workflows(State(p): Shared) -> ApiResult<Response> {
    Ok(ok(&List {
        items: p.store.workflows().await?,
        next_cursor: String::new(),
    }))
}

async fn find_workflow(p: &Platform, id: &str) -> ApiResult<crate::workflow::Workflow> {
    p.store
        .workflow(id.to_owned())
        .await?
        .ok_or_else(|| ApiError::not_found("Workflow not found"))
}

async fn get_workflow(State(p): Shared, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(ok(&find_workflow(&p, &id).await?))
}

async fn delete_workflow(State(p): Shared, Path(id): Path<String>) -> ApiResult<Response> {
    if !p.store.delete_workflow(id).await? {
        return Err(ApiError::not_found("Workflow not found"));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Runs a workflow: its stages' results and timings, or (4xx/5xx) which stage failed and
/// why. Either way, nothing the run started is left running.
async fn invoke_workflow(
    State(p): Shared,
    Path(id): Path<String>,
    headers: HeaderMap,
    request: Body,
) -> ApiResult<Response> {
    let wf = find_workflow(&p, &id).await?;
    let t0 = std::time::Instant::now();
    let input = read_body(&p, &headers, request).await?;
    let (status, body, run_id, seeds_made) = match p.run_workflow(&wf, &input).await {
        Ok(report) => {
            let run_id = report.run_id.clone();
            let seeds_made = report.seeds_made;
            let body = serde_json::to_value(&report).unwrap_or_default();
            (StatusCode::OK, body, run_id, seeds_made)
        }
        Err(failure) => (
            failure.error.status(),
            failure.body(),
            failure.run_id,
            failure.seeds_made,
        ),
    };
    let m = &p.metrics;
    m.workflow_runs
        .get_or_create(&metrics::WorkflowLabels {
            workflow_id: wf.id.clone(),
            workflow_name: wf.name.clone(),
            outcome: metrics::outcome(status),
        })
        .inc();
    m.workflow_seconds
        .get_or_create(&metrics::WorkflowNameLabels {
            workflow_id: wf.id.clone(),
            workflow_name: wf.name.clone(),
        })
        .observe(t0.elapsed().as_secs_f64());
    m.stage_seeds_made.inc_by(seeds_made as u64);
    let mut response = (status, axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&run_id) {
        response.headers_mut().insert("Mitosis-Run-Id", v);
    }
    Ok(response)
}

/// A request's body, within the platform's limit (413 over it).
async fn read_body(p: &Platform, headers: &HeaderMap, request: Body) -> ApiResult<Bytes> {
    let limit = p.config.max_body;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Request content too large (over {limit} bytes)"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    axum::body::to_bytes(request, limit).await.map_err(|e| {
        // A chunked body over the limit; anything else is a client that went away.
        if e.to_string().contains("length limit") {
            too_large()
        } else {
            ApiError::bad_request(format!("reading the request: {e}"))
        }
    })
}

/// What an HTTP function is asked: the method and target its caller used (Fn's `/invoke`
/// is a `POST /`).
#[derive(Clone)]
struct Target {
    method: Method,
    path: String,
    query: Option<String>,
}

impl Target {
    fn request(&self, headers: &HeaderMap) -> HttpRequest {
        let target = match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        };
        HttpRequest {
            method: self.method.to_string(),
            target,
            headers: headers
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
                .collect(),
        }
    }
}

async fn invoke(
    State(p): Shared,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    request: Body,
) -> ApiResult<Response> {
    let f = find_fn(&p, id).await?;
    let target = Target {
        method: Method::POST,
        path: "/".into(),
        query: uri.query().map(str::to_owned),
    };
    call(&p, &f, &target, &headers, request).await
}

async fn invoke_by_name_path(
    State(p): Shared,
    Path((name, rest)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    request: Body,
) -> ApiResult<Response> {
    let target = Target {
        method,
        path: format!("/{rest}"),
        query: uri.query().map(str::to_owned),
    };
    by_name(p, name, target, headers, request).await
}

/// OpenFaaS's gateway route: `NAME` is a function's name if only one app has it, or
/// `NAME.APP` (OpenFaaS's `name.namespace`).
async fn invoke_by_name(
    State(p): Shared,
    Path(name): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    request: Body,
) -> ApiResult<Response> {
    let target = Target {
        method,
        path: "/".into(),
        query: uri.query().map(str::to_owned),
    };
    by_name(p, name, target, headers, request).await
}

async fn by_name(
    p: Arc<Platform>,
    name: String,
    target: Target,
    headers: HeaderMap,
    request: Body,
) -> ApiResult<Response> {
    let mut found = p.store.fns(None, Some(name.clone())).await?;
    if found.is_empty() {
        if let Some((fn_name, app_name)) = name.rsplit_once('.') {
            if let Some(app) = p.store.apps(Some(app_name.to_owned())).await?.pop() {
                found = p.store.fns(Some(app.id), Some(fn_name.to_owned())).await?;
            }
        }
    }
    match found.len() {
        0 => Err(ApiError::not_found("Fn not found")),
        1 => call(&p, &found[0], &target, &headers, request).await,
        _ => Err(ApiError::conflict(format!(
            "{name} names functions of several apps: call NAME.APP"
        ))),
    }
}

/// Fn's header that asks for a detached call.
const INVOKE_TYPE: &str = "fn-invoke-type";

/// Runs a call of `f`: at once (Fn's `sync`), or detached: answered 202 with its call id once
/// its body is in, then run on its own (its answer is logged, not returned).
async fn call(
    p: &Arc<Platform>,
    f: &Func,
    target: &Target,
    headers: &HeaderMap,
    request: Body,
) -> ApiResult<Response> {
    let call_id = crate::ids::ulid();
    match headers.get(INVOKE_TYPE).map(|v| v.to_str().unwrap_or("")) {
        None | Some("sync") => return counted_call(p, f, call_id, target, headers, request).await,
        Some("detached") => {}
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "Invalid Fn-Invoke-Type {other:?} (sync or detached)"
            )));
        }
    }
    let room = p.detached.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "Too many detached calls in flight (at most {})",
                crate::DETACHED_CALLS
            ),
        )
    })?;
    let input = read_body(p, headers, request).await?;
    let (p, f, target, headers) = (p.clone(), f.clone(), target.clone(), headers.clone());
    let id = call_id.clone();
    tokio::spawn(async move {
        let r = counted_call(&p, &f, id.clone(), &target, &headers, Body::from(input)).await;
        let status = r.map_or_else(|e| e.status, |r| r.status());
        tracing::info!(call_id = id, fn_id = f.id, %status, "detached call ended");
        drop(room);
    });
    let mut response = StatusCode::ACCEPTED.into_response();
    if let Ok(v) = HeaderValue::from_str(&call_id) {
        response.headers_mut().insert("Fn-Call-Id", v);
    }
    Ok(response)
}

/// Runs a call of `f`, counted and timed by its outcome.
async fn counted_call(
    p: &Arc<Platform>,
    f: &Func,
    call_id: String,
    target: &Target,
    headers: &HeaderMap,
    request: Body,
) -> ApiResult<Response> {
    let t0 = std::time::Instant::now();
    // A failed call's answer names it too, to find its log lines.
    let mut response = match run_call(p, f, &call_id, target, headers, request).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    if let Ok(v) = HeaderValue::from_str(&call_id) {
        response.headers_mut().insert("Fn-Call-Id", v);
    }
    let status = response.status();
    let m = &p.metrics;
    m.calls
        .get_or_create(&CallLabels {
            fn_id: f.id.clone(),
            fn_name: f.name.clone(),
            outcome: metrics::outcome(status),
        })
        .inc();
    m.call_seconds
        .get_or_create(&FnLabels {
            fn_id: f.id.clone(),
            fn_name: f.name.clone(),
        })
        .observe(t0.elapsed().as_secs_f64());
    Ok(response)
}

async fn run_call(
    p: &Arc<Platform>,
    f: &Func,
    call_id: &str,
    target: &Target,
    headers: &HeaderMap,
    request: Body,
) -> ApiResult<Response> {
    let input = read_body(p, headers, request).await?;
    let Invoked {
        host,
        answer,
        start,
        ..
    } = p
        .invoke_as(
            call_id.to_owned(),
            f,
            input,
            http_contract::is_http(&f.annotations).then(|| target.request(headers)),
        )
        .await?;
    let mut response = match answer.http {
        // The function's own status and headers.
        Some((status, headers)) => {
            let mut r = (
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                answer.output,
            )
                .into_response();
            for (name, value) in headers {
                if let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_bytes(&value),
                ) {
                    r.headers_mut().append(n, v);
                }
            }
            r
        }
        None => {
            let content_type = HeaderValue::from_static(content_type(&answer.output));
            let mut r = (StatusCode::OK, answer.output).into_response();
            r.headers_mut().insert(header::CONTENT_TYPE, content_type);
            r
        }
    };
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&host) {
        h.insert("Mitosis-Host", v);
    }
    // fork, cold or warm: how the process that answered came to be.
    h.insert("Mitosis-Start", HeaderValue::from_static(start.name()));
    p.metrics
        .starts
        .get_or_create(&crate::metrics::StartLabels {
            fn_id: f.id.clone(),
            fn_name: f.name.clone(),
            policy: p.strategy(f).name(),
            start: start.name(),
        })
        .inc();
    Ok(response)
}

/// The stdin/stdout contract carries no content type: say what the answer looks like.
fn content_type(output: &[u8]) -> &'static str {
    if serde_json::from_slice::<serde::de::IgnoredAny>(output).is_ok() {
        "application/json"
    } else if std::str::from_utf8(output).is_ok() {
        "text/plain; charset=utf-8"
    } else {
        "application/octet-stream"
    }
}

/// The hosts as the platform sees them, and where each function's seed is.
/// Liveness: the API answers.
async fn healthz() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

/// Readiness: the store answers and a poll found at least one host up; 503 with why not.
async fn readyz(State(p): Shared) -> Response {
    let store = p.store.app("readyz".into()).await;
    let up = p.hosts.polled_up();
    let mut why = Vec::new();
    if let Err(e) = &store {
        why.push(e.to_string());
    }
    if up.is_empty() {
        why.push(format!("no host up yet (of {})", p.hosts.len()));
    }
    let code = match why.is_empty() {
        true => StatusCode::OK,
        false => StatusCode::SERVICE_UNAVAILABLE,
    };
    let body = json!({
        "ready": why.is_empty(),
        "store": store.is_ok(),
        "hosts_up": up,
        "not_ready": why,
    });
    (code, axum::Json(body)).into_response()
}

async fn hosts(State(p): Shared) -> ApiResult<Response> {
    let hosts = p.hosts.report();
    let fns = p.store.fns(None, None).await?;
    let seeds: Vec<_> = fns
        .iter()
        .map(|f| {
            let seed = p.seeds.current(&f.id);
            json!({
                "fn_id": f.id,
                "name": f.name,
                "image": f.image,
                "seed_host": seed.map(|s| p.hosts.get(s.host).spec.name.clone()),
            })
        })
        .collect();
    Ok(ok(
        &json!({"policy": p.policy.name(), "hosts": hosts, "seeds": seeds}),
    ))
}

/// The platform's metrics, in OpenMetrics text.
async fn metrics(State(p): Shared) -> Response {
    match metrics::render(&p.registry) {
        Ok(text) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[cfg(test)]
mod health_tests {
    use crate::{Config, HostSpec, Platform, store::Store};

    /// `GET path`: its status code and JSON body.
    fn get(addr: std::net::SocketAddr, path: &str) -> (u16, serde_json::Value) {
        let (code, _, body) = crate::test_http::get(addr, path);
        (code, serde_json::from_str(&body).unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn live_but_not_ready_without_a_host_up() {
        let host: HostSpec = "h0=/nonexistent/mitosisd.sock".parse().unwrap();
        let platform = Platform::new(Config::default(), Store::in_memory().unwrap(), vec![host]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = super::router(platform.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let probe = move |path: &'static str| tokio::task::spawn_blocking(move || get(addr, path));

        let (code, body) = probe("/healthz").await.unwrap();
        assert_eq!((code, body["status"].as_str()), (200, Some("ok")));
        // Never polled counts as up for calls, not for readiness; polled, it is down.
        platform.hosts.poll(0).await;
        let (code, body) = probe("/readyz").await.unwrap();
        assert_eq!(code, 503, "{body}");
        assert_eq!(body["ready"], false);
        assert_eq!(body["store"], true);
        assert_eq!(body["hosts_up"], serde_json::json!([]));
        let why = body["not_ready"][0].as_str().unwrap();
        assert!(why.starts_with("no host up"), "{body}");
    }
}
