//! A live web dashboard: `GET /dashboard`, one self-contained HTML page (no external fetch:
//! its script, styles and SVG charts are inline), and the JSON it polls every second,
//! `GET /mitosis/dashboard.json` (docs/schemas/dashboard.schema.json).
//!
//! Nothing here waits on a daemon: the hosts' load is what their last poll found
//! ([`crate::hosts`] polls them on tasks of their own), seeds and instances are what the
//! platform holds, functions and apps come from the store, and the calls' history from
//! [`History`]: per function, a ring of [`BUCKET_SECS`] s buckets over the last
//! [`WINDOW_BUCKETS`] of them (30 minutes), each with its calls counted by how their process
//! started (fork, cold, warm) or failed, and log-scale histograms of start and call latency
//! (percentiles within about 9 %). Memory is bounded: at most [`MAX_FUNCTIONS`] functions of
//! at most [`WINDOW_BUCKETS`] buckets, each histogram at most [`BINS`] (bin, count) pairs.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::{Platform, StoreError};

mod history;

pub use history::{
    BINS, BUCKET_SECS, Counts, History, MAX_FUNCTIONS, Outcome, Percentiles, Point, Running,
    Series, WINDOW_BUCKETS,
};
use history::{bucket_now, now_ms};

/// The page, embedded in the binary.
const PAGE: &str = include_str!("dashboard.html");

/// What the page may load: itself, and the JSON from this origin. Nothing from elsewhere.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                   connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

/// `GET /dashboard` and `GET /mitosis/dashboard.json`, to merge into the API's router.
pub fn router() -> Router<Arc<Platform>> {
    Router::new()
        .route("/dashboard", get(page))
        .route("/mitosis/dashboard.json", get(json))
}

async fn page() -> Response {
    let mut r = axum::response::Html(PAGE).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[derive(Deserialize)]
struct SeriesQuery {
    /// `all` (the default), `none`, or a function's id: whose series to include.
    series: Option<String>,
}

async fn json(State(p): State<Arc<Platform>>, Query(q): Query<SeriesQuery>) -> Response {
    let series = match q.series.as_deref() {
        None | Some("all") => Series::All,
        Some("none") => Series::None,
        Some(id) => Series::Of(id.to_owned()),
    };
    match snapshot(&p, &series).await {
        Ok(d) => {
            let mut r = axum::Json(d).into_response();
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// `GET /mitosis/dashboard.json`.
#[derive(Debug, Serialize)]
pub struct Dashboard {
    /// When it was taken, in milliseconds since the epoch.
    pub now_ms: u64,
    pub bucket_secs: u64,
    pub window_secs: u64,
    /// The placement policy, and the start policy of functions that do not name theirs.
    pub placement: &'static str,
    pub default_policy: &'static str,
    pub hosts: Vec<HostLoad>,
    pub functions: Vec<FnView>,
    pub totals: Totals,
    /// Every function's calls together, per bucket with calls.
    pub series: Vec<Point>,
}

/// A host and its load, as its last poll found it.
#[derive(Debug, Serialize)]
pub struct HostLoad {
    pub name: String,
    pub endpoint: String,
    pub up: bool,
    /// Why it is down (its last poll's or call's error).
    pub error: Option<String>,
    /// This platform's calls running there now.
    pub calls_in_flight: u64,
    /// Children its daemon runs (every platform's and client's), by its last status.
    pub children_running: u64,
    pub cpus: Option<u64>,
    pub memory_available_mib: Option<u64>,
    pub seeds: usize,
    pub replicas: usize,
}

/// A function, where its seeds are, and its calls.
#[derive(Debug, Serialize)]
pub struct FnView {
    pub id: String,
    pub name: String,
    pub app_id: String,
    pub app: Option<String>,
    /// How its calls start: remote-fork, local-fork, fn-cache or cold.
    pub policy: &'static str,
    pub memory_mib: u64,
    pub timeout_secs: u32,
    pub image: String,
    /// The host of its one seed for the cluster (remote fork), if it has one ready.
    pub seed_host: Option<String>,
    /// The hosts holding a replica of that seed.
    pub replica_hosts: Vec<String>,
    /// The hosts with a seed of their own (local fork).
    pub local_seed_hosts: Vec<String>,
    /// Instances kept warm, idle now (fn-cache).
    pub idle_instances: usize,
    /// Its calls running now.
    pub calls_in_flight: u64,
    /// Its calls since this platform started, and over the window.
    pub totals: Counts,
    pub window: Counts,
    /// Over the window: start latency (calls that started a process) and call latency.
    pub start_ms: Option<Percentiles>,
    pub call_ms: Option<Percentiles>,
    pub series: Vec<Point>,
}

/// The whole cluster now.
#[derive(Debug, Serialize)]
pub struct Totals {
    pub hosts: usize,
    pub hosts_up: usize,
    pub calls_in_flight: u64,
    pub children_running: u64,
    /// Every function's calls since this platform started.
    #[serde(flatten)]
    pub counts: Counts,
}

/// The dashboard now. Reads the store (functions, apps); everything else is in memory.
pub async fn snapshot(p: &Platform, series: &Series) -> Result<Dashboard, StoreError> {
    let fns = p.store.fns(None, None).await?;
    let apps: HashMap<String, String> = p
        .store
        .apps(None)
        .await?
        .into_iter()
        .map(|a| (a.id, a.name))
        .collect();
    let (mut stats, cluster) = p.history.view(bucket_now(), series);
    let reports = p.hosts.report();
    let name_of = |index: usize| reports.get(index).map(|h| h.name.clone());
    let idle: HashMap<String, usize> = p.instances.counts().into_iter().collect();
    let mut counts = Counts::default();
    for s in stats.values() {
        counts.add(&s.totals);
    }
    let functions = fns
        .into_iter()
        .map(|f| {
            let seed = p.seeds.current(&f.id);
            let replica_hosts = seed.as_ref().map_or_else(Vec::new, |seed| {
                p.hosts
                    .views(Some(seed), 0, &[])
                    .iter()
                    .filter(|v| v.has_replica)
                    .filter_map(|v| name_of(v.index))
                    .collect()
            });
            let mut local: Vec<usize> = p.seeds.local_hosts(&f.id);
            local.sort_unstable();
            let s = stats.remove(&f.id);
            FnView {
                app: apps.get(&f.app_id).cloned(),
                policy: p.strategy(&f).name(),
                memory_mib: f.memory,
                timeout_secs: f.timeout,
                seed_host: seed.and_then(|s| name_of(s.host)),
                replica_hosts,
                local_seed_hosts: local.into_iter().filter_map(name_of).collect(),
                idle_instances: idle.get(&f.id).copied().unwrap_or(0),
                calls_in_flight: s.as_ref().map_or(0, |s| s.in_flight),
                totals: s.as_ref().map(|s| s.totals).unwrap_or_default(),
                window: s.as_ref().map(|s| s.window).unwrap_or_default(),
                start_ms: s.as_ref().and_then(|s| s.start_ms),
                call_ms: s.as_ref().and_then(|s| s.call_ms),
                series: s.map(|s| s.series).unwrap_or_default(),
                id: f.id,
                name: f.name,
                app_id: f.app_id,
                image: f.image,
            }
        })
        .collect();
    let hosts: Vec<HostLoad> = reports
        .into_iter()
        .map(|h| HostLoad {
            name: h.name,
            endpoint: h.socket,
            up: h.up,
            error: h.error,
            calls_in_flight: h.inflight,
            children_running: h.children_running,
            cpus: h.cpus,
            memory_available_mib: h.memory_available_mib,
            seeds: h.seeds,
            replicas: h.replicas,
        })
        .collect();
    Ok(Dashboard {
        now_ms: now_ms(),
        bucket_secs: BUCKET_SECS,
        window_secs: BUCKET_SECS * WINDOW_BUCKETS,
        placement: p.policy.name(),
        default_policy: p.config.strategy.name(),
        totals: Totals {
            hosts: hosts.len(),
            hosts_up: hosts.iter().filter(|h| h.up).count(),
            calls_in_flight: hosts.iter().map(|h| h.calls_in_flight).sum(),
            children_running: hosts.iter().map(|h| h.children_running).sum(),
            counts,
        },
        hosts,
        functions,
        series: cluster,
    })
}

#[cfg(test)]
mod tests {
    use super::history::tests::answered;
    use super::*;
    use crate::Start;
    use crate::test_http::get;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_page_is_self_contained_and_its_json_fits_its_schema() {
        use crate::model::{App, AppInput, Func, FuncInput};
        use crate::{Config, HostSpec, store::Store};

        let hosts: Vec<HostSpec> = vec![
            "h0=/nonexistent/h0.sock".parse().unwrap(),
            "h1=tcp://127.0.0.1:9".parse().unwrap(),
        ];
        let p = Platform::new(Config::default(), Store::in_memory().unwrap(), hosts);
        p.hosts.poll(0).await;
        let app = App::create(AppInput {
            name: Some("shop".into()),
            ..Default::default()
        })
        .unwrap();
        p.store.insert_app(app.clone()).await.unwrap();
        let f = Func::create(FuncInput {
            name: Some("thumbs".into()),
            app_id: Some(app.id.clone()),
            image: Some("/nonexistent/bundle".into()),
            ..Default::default()
        })
        .unwrap();
        p.store.insert_fn(f.clone()).await.unwrap();
        let now = bucket_now();
        p.history.record_at(
            &f.id,
            answered(Start::Fork, 4000),
            Duration::from_millis(9),
            now,
        );
        p.history
            .record_at(&f.id, Outcome::Failed, Duration::from_millis(2), now);

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app_router = crate::api::router(p.clone());
        tokio::spawn(async move { axum::serve(listener, app_router).await });
        let fetch = move |path: String| tokio::task::spawn_blocking(move || get(addr, &path));

        let (code, head, page) = fetch("/dashboard".into()).await.unwrap();
        assert_eq!(code, 200);
        assert!(head.contains("content-type: text/html"), "{head}");
        assert!(
            head.contains("content-security-policy: default-src 'none'"),
            "{head}"
        );
        // Nothing is loaded from elsewhere: no external script, style, image or font.
        for external in ["src=", "@import", "url(", "https://"] {
            assert!(!page.contains(external), "the page has {external:?}");
        }
        for (at, _) in page.match_indices("href=") {
            assert!(
                page[at..].starts_with("href=\"data:"),
                "{}",
                &page[at..at + 40]
            );
        }
        assert!(page.contains("mitosis/dashboard.json"));

        let schema: serde_json::Value = serde_json::from_str(include_str!(
            "../../../../docs/schemas/dashboard.schema.json"
        ))
        .unwrap();
        let validator = jsonschema::validator_for(&schema).expect("the schema compiles");
        for query in ["", "?series=none", "?series=all"] {
            let path = format!("/mitosis/dashboard.json{query}");
            let (code, _, body) = fetch(path).await.unwrap();
            assert_eq!(code, 200, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let errors: Vec<String> = validator.iter_errors(&v).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{query}: {errors:?}\n{v:#}");
            assert_eq!(v["hosts"][0]["name"], "h0");
            assert_eq!(v["hosts"][0]["up"], false);
            assert!(v["hosts"][0]["error"].is_string());
            assert_eq!(v["hosts"][1]["endpoint"], "tcp://127.0.0.1:9");
            let thumbs = &v["functions"][0];
            assert_eq!(
                (&thumbs["name"], &thumbs["app"], &thumbs["policy"]),
                (&"thumbs".into(), &"shop".into(), &"remote-fork".into())
            );
            assert_eq!(thumbs["totals"]["calls"], 2);
            assert_eq!(thumbs["totals"]["fork"], 1);
            assert_eq!(thumbs["totals"]["failed"], 1);
            assert!(thumbs["start_ms"]["p50"].as_f64().unwrap() > 3.5);
            assert_eq!(v["totals"]["calls"], 2);
            assert_eq!(v["series"][0]["calls"], 2);
            let series = thumbs["series"].as_array().unwrap().len();
            assert_eq!(series, usize::from(query != "?series=none"), "{query}");
        }
        // A deleted function's history goes with it.
        p.removed(&f.id).await;
        assert!(p.history.lock().is_empty());
    }
}
