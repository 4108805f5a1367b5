//! Which fields of config.json mitosis reads. oci-spec drops the fields it does not know, so
//! the raw JSON is checked: a field mitosis cannot honour, set to anything but empty, is an
//! error before anything starts, and so is a field it has never heard of. A function never
//! runs with part of its configuration silently dropped.

use serde_json::{Map, Value};

use crate::spec::BundleError;

/// Fields read (or harmless to leave: `annotations` are the caller's notes, `consoleSize`
/// comes with a terminal, which is refused, `cgroupsPath` names a place the daemon chooses
/// for itself), per object.
const READ: [(&str, &[&str]); 5] = [
    (
        "",
        &[
            "ociVersion",
            "process",
            "root",
            "hostname",
            "mounts",
            "linux",
            "annotations",
        ],
    ),
    ("root", &["path", "readonly"]),
    (
        "process",
        &[
            "terminal",
            "consoleSize",
            "user",
            "args",
            "env",
            "cwd",
            "capabilities",
            "rlimits",
            "noNewPrivileges",
            "oomScoreAdj",
            "apparmorProfile",
            "selinuxLabel",
        ],
    ),
    ("process.user", &["uid", "gid", "umask", "additionalGids"]),
    (
        "linux",
        &[
            "namespaces",
            "uidMappings",
            "gidMappings",
            "sysctl",
            "resources",
            "cgroupsPath",
            "seccomp",
            "rootfsPropagation",
            "maskedPaths",
            "readonlyPaths",
        ],
    ),
];

/// Fields mitosis does not apply, accepted only when empty.
const REFUSED_UNLESS_EMPTY: [&str; 6] = [
    "linux.uidMappings",
    "linux.gidMappings",
    "linux.devices",
    "linux.mountLabel",
    "hooks",
    "domainname",
];

/// Checks every field of `config` (the parsed config.json) against what mitosis reads.
pub fn check(config: &Value) -> Result<(), BundleError> {
    let Some(top) = config.as_object() else {
        return Err(BundleError::Unsupported(
            "a config that is not an object".into(),
        ));
    };
    check_object("", top)?;
    for (path, object) in [
        ("root", config.get("root")),
        ("process", config.get("process")),
        ("process.user", config.pointer("/process/user")),
        ("linux", config.get("linux")),
    ] {
        if let Some(Value::Object(map)) = object {
            check_object(path, map)?;
        }
    }
    if let Some(p) = config
        .pointer("/linux/rootfsPropagation")
        .and_then(Value::as_str)
    {
        // Every container's mounts are private; a propagation that shares them is not made.
        if !matches!(p, "" | "private" | "rprivate" | "slave" | "rslave") {
            return Err(BundleError::Unsupported(format!(
                "linux.rootfsPropagation {p:?} (containers' mounts are private)"
            )));
        }
    }
    Ok(())
}

fn check_object(path: &str, map: &Map<String, Value>) -> Result<(), BundleError> {
    let read = READ
        .iter()
        .find(|(p, _)| *p == path)
        .map_or(&[][..], |(_, fields)| *fields);
    for (key, value) in map {
        let name = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        let empty = match value {
            Value::Null => true,
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            Value::String(s) => s.is_empty(),
            _ => false,
        };
        if REFUSED_UNLESS_EMPTY.contains(&name.as_str()) {
            if !empty {
                return Err(BundleError::Unsupported(name));
            }
        } else if !read.contains(&key.as_str()) && !empty {
            return Err(BundleError::Unsupported(format!(
                "{name} (a field mitosis does not apply)"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra_process: &str, extra_linux: &str, extra: &str) -> Value {
        let text = format!(
            r#"{{"ociVersion": "1.2.0", "root": {{"path": "rootfs"}},
                "process": {{"args": ["sh"], "cwd": "/", "user": {{"uid": 0, "gid": 0}}{extra_process}}},
                "linux": {{"namespaces": [{{"type": "pid"}}]{extra_linux}}}{extra}}}"#
        );
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn what_mitosis_reads_and_empty_refusals_pass() {
        let ok = config(
            r#", "oomScoreAdj": 100, "consoleSize": {"height": 1, "width": 2}"#,
            r#", "uidMappings": [], "devices": [], "cgroupsPath": "/x", "rootfsPropagation": "rslave""#,
            r#", "hooks": {}, "annotations": {"a": "b"}"#,
        );
        check(&ok).unwrap();
    }

    #[test]
    fn fields_mitosis_does_not_apply_are_refused_by_name() {
        for (c, want) in [
            (
                config(
                    "",
                    "",
                    r#", "hooks": {"prestart": [{"path": "/bin/true"}]}"#,
                ),
                "hooks",
            ),
            (
                config(
                    "",
                    r#", "devices": [{"path": "/dev/fuse", "type": "c"}]"#,
                    "",
                ),
                "linux.devices",
            ),
            (
                config("", r#", "personality": {"domain": "LINUX32"}"#, ""),
                "linux.personality",
            ),
            (
                config(r#", "ioPriority": {"class": "IOPRIO_CLASS_IDLE"}"#, "", ""),
                "process.ioPriority",
            ),
            (
                config("", r#", "rootfsPropagation": "shared""#, ""),
                "rootfsPropagation",
            ),
            (config("", "", r#", "vm": {"hypervisor": {}}"#), "vm"),
        ] {
            let err = check(&c).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should name {want:?}");
        }
        let user = serde_json::json!({"process": {"user": {"uid": 0, "gid": 0, "username": "fn"}}});
        assert!(
            check(&user)
                .unwrap_err()
                .to_string()
                .contains("process.user.username")
        );
    }
}
