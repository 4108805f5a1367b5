//! The same behaviour from both backends: SQLite always, etcd on a throwaway local server
//! (required when running as root or in CI: its absence fails the test there).

use std::time::Duration;

use super::*;
use crate::etcd::local::{self, LocalEtcd};
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

fn seed(fn_id: &str, host: &str) -> SeedRecord {
    SeedRecord {
        fn_id: fn_id.into(),
        host: host.into(),
        handle: "mitosis://10.0.0.1:7070/1/secret".into(),
        image: "/bundle".into(),
        seed_id: 1,
        seed_addr: "10.0.0.1:7070".into(),
    }
}

fn host(name: &str) -> HostRecord {
    HostRecord {
        name: name.into(),
        endpoint: format!("/run/{name}.sock"),
        listen: "10.0.0.1:7070".into(),
        children_running: 2,
        seeds: vec![1],
        replicas: 0,
        registered_by: String::new(),
    }
}

/// A local etcd, or `None` where it may be missing (not root, not CI): said on stderr.
fn etcd() -> Option<LocalEtcd> {
    if !local::installed() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        assert!(
            !root && std::env::var_os("CI").is_none(),
            "etcd is missing: the etcd backend's tests need it (scripts/setup.sh installs etcd-server)"
        );
        eprintln!("SKIPPED: the etcd backend's tests (no etcd binary; not root, not CI)");
        return None;
    }
    Some(LocalEtcd::start().expect("a local etcd starts"))
}

async fn connect(etcd: &LocalEtcd, prefix: &str) -> Store {
    let mut o = crate::etcd::EtcdOptions::new(vec![etcd.endpoint.clone()]);
    o.prefix = prefix.into();
    Store::Etcd(crate::etcd::EtcdStore::connect(&o).await.unwrap())
}

/// Apps and functions: unique names, filters, updates, cascade; seed records.
async fn apps_and_functions(store: &Store) {
    let a = app("a");
    assert_eq!(store.insert_app(a.clone()).await.unwrap(), Insert::Done);
    assert_eq!(store.insert_app(app("a")).await.unwrap(), Insert::NameTaken);
    let b = app("b");
    assert_eq!(store.insert_app(b.clone()).await.unwrap(), Insert::Done);
    let f = func(&a.id, "f");
    assert_eq!(store.insert_fn(f.clone()).await.unwrap(), Insert::Done);
    assert_eq!(
        store.insert_fn(func(&a.id, "f")).await.unwrap(),
        Insert::NameTaken
    );
    // The same name in another app is another function.
    let g = func(&b.id, "f");
    assert_eq!(store.insert_fn(g.clone()).await.unwrap(), Insert::Done);
    assert_eq!(
        store.insert_fn(func("nope", "g")).await.unwrap(),
        Insert::NoApp
    );

    assert_eq!(store.func(f.id.clone()).await.unwrap(), Some(f.clone()));
    assert_eq!(
        store.fns(Some(a.id.clone()), None).await.unwrap(),
        vec![f.clone()]
    );
    assert_eq!(store.fns(None, Some("f".into())).await.unwrap().len(), 2);
    assert_eq!(
        store
            .fns(Some(b.id.clone()), Some("f".into()))
            .await
            .unwrap(),
        vec![g.clone()]
    );
    assert_eq!(store.apps(Some("a".into())).await.unwrap(), vec![a.clone()]);
    assert_eq!(store.apps(None).await.unwrap(), vec![a.clone(), b.clone()]);

    let mut a2 = a.clone();
    a2.config.insert("K".into(), "v".into());
    assert!(store.update_app(a2.clone()).await.unwrap());
    assert_eq!(store.app(a.id.clone()).await.unwrap(), Some(a2));
    assert!(!store.update_app(app("ghost")).await.unwrap());
    let mut f2 = f.clone();
    f2.timeout = 7;
    assert!(store.update_fn(f2.clone()).await.unwrap());
    assert_eq!(store.func(f.id.clone()).await.unwrap(), Some(f2));

    // Deleting a function frees its name.
    assert!(store.delete_fn(g.id.clone()).await.unwrap());
    assert!(!store.delete_fn(g.id.clone()).await.unwrap());
    assert_eq!(
        store.insert_fn(func(&b.id, "f")).await.unwrap(),
        Insert::Done
    );

    // Deleting an app deletes its functions, and frees its name.
    assert_eq!(
        store.delete_app(a.id.clone()).await.unwrap(),
        Some(vec![f.id.clone()])
    );
    assert_eq!(store.func(f.id.clone()).await.unwrap(), None);
    assert_eq!(store.delete_app(a.id.clone()).await.unwrap(), None);
    assert_eq!(store.insert_app(app("a")).await.unwrap(), Insert::Done);
    assert_eq!(store.fns(Some(b.id.clone()), None).await.unwrap().len(), 1);
}

fn workflow(name: &str) -> crate::workflow::Workflow {
    let input: crate::workflow::WorkflowInput = serde_json::from_value(serde_json::json!({
        "name": name,
        "stages": [{"name": "a", "function": "app/f"}, {"name": "b", "fork": "a", "inputs": [1, {"x": 2}]}],
    }))
    .unwrap();
    let (name, stages) = crate::workflow::check(input).unwrap();
    crate::workflow::Workflow {
        id: crate::ids::ulid(),
        name,
        stages,
        created_at: crate::ids::now_rfc3339(),
    }
}

/// Workflows: unique names, read back whole, listed, deleted (freeing the name).
async fn workflows(store: &Store) {
    let w = workflow("w");
    assert!(store.insert_workflow(w.clone()).await.unwrap());
    assert!(!store.insert_workflow(workflow("w")).await.unwrap());
    let v = workflow("v");
    assert!(store.insert_workflow(v.clone()).await.unwrap());
    assert_eq!(store.workflow(w.id.clone()).await.unwrap(), Some(w.clone()));
    assert_eq!(store.workflows().await.unwrap(), vec![w.clone(), v.clone()]);
    assert!(store.delete_workflow(w.id.clone()).await.unwrap());
    assert!(!store.delete_workflow(w.id.clone()).await.unwrap());
    assert_eq!(store.workflow(w.id.clone()).await.unwrap(), None);
    assert!(store.insert_workflow(workflow("w")).await.unwrap());
}

fn trigger(app_id: &str, fn_id: &str, name: &str, source: &str) -> crate::trigger::Trigger {
    crate::trigger::Trigger::create(
        serde_json::from_value(serde_json::json!({"name": name, "app_id": app_id,
            "fn_id": fn_id, "type": "http", "source": source}))
        .unwrap(),
    )
    .unwrap()
}

/// Triggers: a name and a route each unique in an app, a function of that app, moved routes
/// freeing the old one, listed by name, and gone with their function and their app.
async fn triggers(store: &Store) {
    let a = app("t-app");
    let other = app("t-other");
    store.insert_app(a.clone()).await.unwrap();
    store.insert_app(other.clone()).await.unwrap();
    let (f, g) = (func(&a.id, "f"), func(&other.id, "g"));
    store.insert_fn(f.clone()).await.unwrap();
    store.insert_fn(g.clone()).await.unwrap();
    let hello = trigger(&a.id, &f.id, "hello", "/hello");
    let write = |t| store.insert_trigger(t);
    assert_eq!(write(hello.clone()).await.unwrap(), TriggerWrite::Done);
    let same_name = trigger(&a.id, &f.id, "hello", "/other");
    assert_eq!(write(same_name).await.unwrap(), TriggerWrite::NameTaken);
    let same_route = trigger(&a.id, &f.id, "bye", "/hello");
    assert_eq!(write(same_route).await.unwrap(), TriggerWrite::SourceTaken);
    let foreign = trigger(&a.id, &g.id, "g", "/g");
    assert_eq!(write(foreign).await.unwrap(), TriggerWrite::NoFn);
    // Another app may use the same name and route.
    let theirs = trigger(&other.id, &g.id, "hello", "/hello");
    assert_eq!(write(theirs.clone()).await.unwrap(), TriggerWrite::Done);
    let bye = trigger(&a.id, &f.id, "bye", "/bye");
    assert_eq!(write(bye.clone()).await.unwrap(), TriggerWrite::Done);

    let of_a = TriggerQuery {
        app_id: Some(a.id.clone()),
        ..TriggerQuery::default()
    };
    let names =
        |ts: Vec<crate::trigger::Trigger>| ts.into_iter().map(|t| t.name).collect::<Vec<_>>();
    assert_eq!(
        names(store.triggers(of_a.clone()).await.unwrap()),
        ["bye", "hello"]
    );
    let route = TriggerQuery {
        source: Some("/hello".into()),
        kind: Some("http".into()),
        ..of_a.clone()
    };
    assert_eq!(store.triggers(route).await.unwrap(), vec![hello.clone()]);

    // Moving a route onto a taken one fails; onto a free one frees the old.
    let mut moved = bye.clone();
    moved.source = "/hello".into();
    assert_eq!(
        store.update_trigger(moved).await.unwrap(),
        TriggerWrite::SourceTaken
    );
    let mut moved = bye.clone();
    moved.source = "/farewell".into();
    assert_eq!(
        store.update_trigger(moved.clone()).await.unwrap(),
        TriggerWrite::Done
    );
    assert_eq!(store.trigger(bye.id.clone()).await.unwrap(), Some(moved));
    let reuse = trigger(&a.id, &f.id, "again", "/bye");
    assert_eq!(write(reuse).await.unwrap(), TriggerWrite::Done);

    assert!(store.delete_trigger(hello.id.clone()).await.unwrap());
    assert!(!store.delete_trigger(hello.id.clone()).await.unwrap());
    assert_eq!(
        write(trigger(&a.id, &f.id, "hello", "/hello"))
            .await
            .unwrap(),
        TriggerWrite::Done
    );
    // A deleted function takes its triggers, and a deleted app its functions' triggers.
    assert!(store.delete_fn(f.id.clone()).await.unwrap());
    assert!(store.triggers(of_a).await.unwrap().is_empty());
    store.delete_app(other.id.clone()).await.unwrap();
    assert_eq!(store.trigger(theirs.id).await.unwrap(), None);
    store.delete_app(a.id).await.unwrap();
}

#[tokio::test]
async fn sqlite_in_a_file_keeps_records_across_opens() {
    let dir = std::env::temp_dir().join(format!("mitosis-platform-store-{}", crate::ids::ulid()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("store.db");
    let store = Store::open(&path).unwrap();
    apps_and_functions(&store).await;
    let a = app("kept");
    store.insert_app(a.clone()).await.unwrap();
    let f = func(&a.id, "f");
    store.insert_fn(f.clone()).await.unwrap();
    assert!(store.put_seed(seed(&f.id, "h0")).await.unwrap());
    assert!(!store.put_seed(seed("nofn", "h0")).await.unwrap());
    let w = workflow("kept");
    assert!(store.insert_workflow(w.clone()).await.unwrap());
    drop(store);

    let store = Store::open(&path).unwrap();
    assert_eq!(store.workflow(w.id.clone()).await.unwrap(), Some(w));
    assert_eq!(store.func(f.id.clone()).await.unwrap(), Some(f.clone()));
    assert_eq!(
        store.seed(f.id.clone()).await.unwrap(),
        Some(seed(&f.id, "h0"))
    );
    assert!(store.claim_seed(&f.id).await.unwrap());
    assert_eq!(
        store.take_seed(f.id.clone()).await.unwrap(),
        Some(seed(&f.id, "h0"))
    );
    assert_eq!(store.seed(f.id).await.unwrap(), None);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn sqlite_in_memory() {
    let store = Store::in_memory().unwrap();
    apps_and_functions(&store).await;
    workflows(&store).await;
    triggers(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_has_the_same_semantics_across_instances_and_leases() {
    let Some(server) = etcd() else { return };
    let prefix = format!("/mitosis-test-{}", crate::ids::ulid());
    let a = connect(&server, &prefix).await;
    apps_and_functions(&a).await;
    workflows(&a).await;
    triggers(&a).await;

    // A second instance sees the same records, and the names are unique across both.
    let b = connect(&server, &prefix).await;
    let shop = app("shop");
    assert_eq!(a.insert_app(shop.clone()).await.unwrap(), Insert::Done);
    assert_eq!(b.insert_app(app("shop")).await.unwrap(), Insert::NameTaken);
    let f = func(&shop.id, "thumbs");
    assert_eq!(b.insert_fn(f.clone()).await.unwrap(), Insert::Done);
    assert_eq!(
        a.insert_fn(func(&shop.id, "thumbs")).await.unwrap(),
        Insert::NameTaken
    );
    assert_eq!(a.func(f.id.clone()).await.unwrap(), Some(f.clone()));

    // Concurrent creates of one name: exactly one wins.
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { s.insert_app(app("race")).await.unwrap() })
        })
        .collect();
    let mut done = 0;
    for r in racers {
        if r.await.unwrap() == Insert::Done {
            done += 1;
        }
    }
    assert_eq!(done, 1, "one of 8 concurrent creates of one name");

    // Making a seed is claimed by one instance at a time.
    assert!(a.claim_seed(&f.id).await.unwrap());
    assert!(
        a.claim_seed(&f.id).await.unwrap(),
        "a claim is its holder's"
    );
    assert!(!b.claim_seed(&f.id).await.unwrap());

    // A seed needs its host registered, and goes with the host's lease.
    let (ea, eb) = (a.etcd().unwrap(), b.etcd().unwrap());
    assert!(matches!(
        a.put_seed(seed(&f.id, "h0")).await,
        Err(StoreError::Unregistered(_))
    ));
    use crate::etcd::Registered;
    assert_eq!(ea.publish_host(host("h0")).await.unwrap(), Registered::Mine);
    assert_eq!(ea.publish_host(host("h0")).await.unwrap(), Registered::Mine);
    assert_eq!(
        eb.publish_host(host("h0")).await.unwrap(),
        Registered::Other(ea.instance().to_owned())
    );
    assert!(a.put_seed(seed(&f.id, "h0")).await.unwrap());
    a.release_seed(&f.id).await.unwrap();
    assert!(b.claim_seed(&f.id).await.unwrap(), "released");
    b.release_seed(&f.id).await.unwrap();
    assert_eq!(b.seed(f.id.clone()).await.unwrap(), Some(seed(&f.id, "h0")));
    let hosts = eb.hosts().await.unwrap();
    assert_eq!(hosts.len(), 1);
    assert_eq!(hosts[0].registered_by, ea.instance());
    assert_eq!(hosts[0].children_running, 2);

    // No refresh: the host's entry and its seed drop out within the TTL (and a bit).
    let t0 = std::time::Instant::now();
    loop {
        let gone =
            eb.hosts().await.unwrap().is_empty() && b.seed(f.id.clone()).await.unwrap().is_none();
        if gone {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(crate::etcd::HOST_TTL as u64 + 3),
            "the host's lease did not expire"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its next publish registers it anew, from any instance.
    assert_eq!(eb.publish_host(host("h0")).await.unwrap(), Registered::Mine);
    assert!(b.put_seed(seed(&f.id, "h0")).await.unwrap());
    assert_eq!(
        a.take_seed(f.id.clone()).await.unwrap(),
        Some(seed(&f.id, "h0"))
    );
    // A deleted function's seed is not recorded.
    assert!(a.delete_fn(f.id.clone()).await.unwrap());
    assert!(!b.put_seed(seed(&f.id, "h0")).await.unwrap());

    // A dead instance's claim expires with its lease.
    let g = func(&shop.id, "g");
    a.insert_fn(g.clone()).await.unwrap();
    assert!(a.claim_seed(&g.id).await.unwrap());
    drop(a);
    let t0 = std::time::Instant::now();
    while !b.claim_seed(&g.id).await.unwrap() {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the dead instance's claim did not expire"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(b);
    drop(server);
}

#[tokio::test]
async fn etcd_requests_time_out_instead_of_hanging() {
    // Nothing listens on this port: connecting fails or times out, bounded.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = crate::etcd::EtcdOptions::new(vec![format!("http://127.0.0.1:{port}")]);
    let t0 = std::time::Instant::now();
    let r = crate::etcd::EtcdStore::connect(&o).await;
    assert!(r.is_err());
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}
