//! `--json` output: one object per command, its shape in docs/schemas/ (checked by tests).

use std::path::Path;

use anyhow::Result;
use mitosis_client::{DaemonStatus, FaultStats, PrepareStats, ResumeStats, stats_pairs};
use mitosis_descriptor::Handle;
use serde_json::{Map, Value, json};

use crate::exit::Code;

/// `mitosis status --json`.
pub fn status(s: &DaemonStatus) -> Value {
    json!({
        "listen": s.listen,
        "children_running": s.children_running,
        "children_started": s.children_started,
        "bytes_served": s.bytes_served,
        "peer_connections": s.peer_connections,
        "peer_refused": s.peer_refused,
        "peer_tls_refused": s.peer_tls_refused,
        "control_connections": s.control_connections,
        "control_refused": s.control_refused,
        "control_tls_refused": s.control_tls_refused,
        "cpus": s.cpus,
        "memory_available_mib": s.memory_available_mib,
        "seeds": s.seeds.iter().map(|x| json!({
            "id": x.id, "pid": x.pid, "vmas": x.vmas, "pages": x.pages,
        })).collect::<Vec<_>>(),
        "replicas": s.replicas.iter().map(|r| json!({
            "seed": r.seed, "host": r.host, "pid": r.pid, "pages": r.pages,
            "children": r.children,
        })).collect::<Vec<_>>(),
        "pool": s.pool.iter().map(|(peer, idle)| json!({"peer": peer, "idle": idle}))
            .collect::<Vec<_>>(),
        "containers": s.containers,
    })
}

/// `mitosis prepare --json`: the handle itself only when it is not written to a file.
pub fn prepared(handle: &str, output: Option<&Path>, s: &PrepareStats) -> Result<Value> {
    let parsed: Handle = handle.parse()?;
    let mut out = Map::new();
    match output {
        Some(path) => out.insert("handle_file".into(), json!(path.display().to_string())),
        None => out.insert("handle".into(), json!(handle)),
    };
    out.insert("seed_id".into(), json!(parsed.seed_id));
    out.insert("host".into(), json!(parsed.host.to_string()));
    out.insert(
        "stats".into(),
        json!({
            "warm_us": s.warm_us,
            "stopped_us": s.stopped_us,
            "total_us": s.total_us,
            "vmas": s.vmas,
            "seed_pages": s.seed_pages,
            "descriptor_bytes": s.descriptor_bytes,
            "carried_pages": s.carried_pages,
        }),
    );
    Ok(Value::Object(out))
}

/// `mitosis resume --stats --json`, on stderr once the child ended: its status as `resume`
/// exits with it, the child's own status, and why the daemon killed it.
pub fn resumed(
    exit: i32,
    status: i32,
    killed: Option<&str>,
    start: &ResumeStats,
    faults: &FaultStats,
) -> Value {
    let stats: Map<String, Value> = stats_pairs(start, faults)
        .iter()
        .map(|(k, v)| ((*k).to_string(), json!(v)))
        .collect();
    json!({
        "exit": exit,
        "child_status": status,
        "killed": killed,
        "stats": stats,
    })
}

/// A failure of a command given --json, on stderr.
pub fn error(code: Code, message: &str) -> Value {
    json!({"error": {"exit": code as u8, "kind": code.name(), "message": message}})
}

/// The schemas of docs/schemas/, for tests here and in the end-to-end tests.
#[cfg(test)]
pub mod schemas {
    pub const STATUS: &str = include_str!("../../../docs/schemas/status.schema.json");
    pub const PREPARE: &str = include_str!("../../../docs/schemas/prepare.schema.json");
    pub const RESUME_STATS: &str = include_str!("../../../docs/schemas/resume-stats.schema.json");
    pub const ERROR: &str = include_str!("../../../docs/schemas/error.schema.json");

    /// Panics with every violation if `value` does not fit `schema`.
    pub fn check(schema: &str, value: &serde_json::Value) {
        let schema: serde_json::Value = serde_json::from_str(schema).expect("schema parses");
        let validator = jsonschema::validator_for(&schema).expect("schema compiles");
        let errors: Vec<String> = validator
            .iter_errors(value)
            .map(|e| format!("{} at {}", e, e.instance_path))
            .collect();
        assert!(errors.is_empty(), "{errors:#?}\nin {value:#}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mitosis_client::{ReplicaStatus, SeedStatus};

    #[test]
    fn status_fits_its_schema() {
        let s = DaemonStatus {
            listen: "10.0.0.1:7070".into(),
            children_running: 2,
            seeds: vec![SeedStatus {
                id: 1,
                pid: 42,
                vmas: 30,
                pages: 900,
            }],
            replicas: vec![ReplicaStatus {
                seed: 3,
                host: "10.0.0.2:7070".into(),
                pid: 77,
                pages: 12,
                children: 1,
            }],
            pool: vec![("10.0.0.2:7070".into(), 3)],
            containers: vec!["cgroup v2".into()],
            ..DaemonStatus::default()
        };
        let v = status(&s);
        schemas::check(schemas::STATUS, &v);
        // The text survives a round trip.
        let text = v.to_string();
        assert!(!text.contains('\n'));
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back["replicas"][0]["host"], "10.0.0.2:7070");
        // And the schema is not vacuous.
        let mut wrong = v.clone();
        wrong["seeds"][0]["pid"] = json!("42");
        let schema: Value = serde_json::from_str(schemas::STATUS).unwrap();
        assert!(!jsonschema::is_valid(&schema, &wrong));
        wrong = v.clone();
        wrong.as_object_mut().unwrap().remove("listen");
        assert!(!jsonschema::is_valid(&schema, &wrong));
    }

    #[test]
    fn prepare_fits_its_schema_with_and_without_a_file() {
        let handle = format!("mitosis://10.0.0.1:7070/5/{}", "ab".repeat(32));
        let stats = PrepareStats {
            stopped_us: 300,
            total_us: 2000,
            vmas: 20,
            seed_pages: 1000,
            descriptor_bytes: 4000,
            ..PrepareStats::default()
        };
        let v = prepared(&handle, None, &stats).unwrap();
        schemas::check(schemas::PREPARE, &v);
        assert_eq!(v["seed_id"], 5);
        assert_eq!(v["handle"], handle.as_str());
        let v = prepared(&handle, Some(Path::new("/tmp/seed.handle")), &stats).unwrap();
        schemas::check(schemas::PREPARE, &v);
        assert!(v.get("handle").is_none(), "the key stays in the file: {v}");
        assert!(!v.to_string().contains(&"ab".repeat(32)));
    }

    #[test]
    fn resume_stats_and_errors_fit_their_schemas() {
        let start = ResumeStats {
            cached: true,
            total_us: 900,
            ..ResumeStats::default()
        };
        let v = resumed(3, 3, None, &start, &FaultStats::default());
        schemas::check(schemas::RESUME_STATS, &v);
        assert_eq!(v["stats"]["cached"], 1);
        let v = resumed(
            79,
            137,
            Some("page source lost"),
            &start,
            &FaultStats::default(),
        );
        schemas::check(schemas::RESUME_STATS, &v);
        for code in Code::ALL {
            schemas::check(schemas::ERROR, &error(code, "it failed"));
        }
    }
}
