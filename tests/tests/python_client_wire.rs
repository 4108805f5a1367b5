//! The Python client (clients/python/mitosis) encodes the control protocol by hand: its
//! variant indices and error kinds must be the Rust enums' (a variant added in the middle of
//! `Request` once left it sending the wrong request). No root needed.

use mitosis_transport::control::{
    DaemonError, ErrorKind, Event, PrepareStats, Request, ResumeStats,
};
use mitosis_transport::frame;

fn python_source() -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../clients/python/mitosis/__init__.py"
    );
    std::fs::read_to_string(path).expect("the Python client")
}

/// `NAME = N` in the Python source.
fn constant(src: &str, name: &str) -> u8 {
    src.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} = ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the Python client"))
}

/// The variant index postcard writes first (after the frame's 4-byte length); for a
/// `DaemonError`, its kind's.
fn index<T: serde::Serialize>(msg: &T) -> u8 {
    frame::encode(msg)[4]
}

#[test]
fn the_python_clients_variant_indices_are_the_wire_formats() {
    let src = python_source();
    let resume = Request::Resume {
        handle: String::new(),
        memory_mib: None,
    };
    assert_eq!(constant(&src, "_REQ_RESUME"), index(&resume));
    let drop = Request::Drop {
        handle: String::new(),
    };
    assert_eq!(constant(&src, "_REQ_DROP"), index(&drop));
    assert_eq!(constant(&src, "_EV_DONE"), index(&Event::Done));
    assert_eq!(
        constant(&src, "_REQ_PREPARE_CALLER"),
        index(&Request::PrepareCaller)
    );
    let fill = Request::Fill {
        handle: String::new(),
    };
    assert_eq!(constant(&src, "_REQ_FILL"), index(&fill));
    // fork_prepare(profile=...): the variant, `pid: None` as one zero byte, the name.
    let profiled = Request::PrepareProfiled {
        pid: None,
        profile: "ab".into(),
    };
    assert_eq!(constant(&src, "_REQ_PREPARE_PROFILED"), index(&profiled));
    assert_eq!(
        frame::encode(&profiled)[4..],
        [index(&profiled), 0, 2, b'a', b'b']
    );
    assert!(
        src.contains(r#"_frame(_varint(_REQ_PREPARE_PROFILED) + b"\x00" + _string(str(profile)))"#),
        "the Python client encodes PrepareProfiled otherwise"
    );
    let prepared = Event::Prepared {
        handle: String::new(),
        stats: PrepareStats::default(),
    };
    assert_eq!(constant(&src, "_EV_PREPARED"), index(&prepared));
    let started = Event::Started {
        pid: 0,
        stats: ResumeStats::default(),
    };
    assert_eq!(constant(&src, "_EV_STARTED"), index(&started));
    let exited = Event::Exited {
        status: 0,
        reason: None,
        stats: Default::default(),
    };
    assert_eq!(constant(&src, "_EV_EXITED"), index(&exited));
    let error = Event::Error(DaemonError::new(ErrorKind::Failed, ""));
    assert_eq!(constant(&src, "_EV_ERROR"), index(&error));
}

#[test]
fn the_python_clients_error_kinds_are_in_the_wire_order() {
    let src = python_source();
    let start = src.find("_ERROR_KINDS = [").expect("_ERROR_KINDS");
    let listed: Vec<&str> = src[start..]
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with(']'))
        .map(|l| l.trim().trim_end_matches(',').trim_matches('"'))
        .collect();
    let kinds = [
        ErrorKind::BadRequest,
        ErrorKind::Denied,
        ErrorKind::NoSuchSeed,
        ErrorKind::WrongKey,
        ErrorKind::Unreachable,
        ErrorKind::SeedGone,
        ErrorKind::NoSuchProcess,
        ErrorKind::Unsupported,
        ErrorKind::Unavailable,
        ErrorKind::Failed,
    ];
    assert_eq!(listed.len(), kinds.len(), "{listed:?}");
    for (i, kind) in kinds.iter().enumerate() {
        let body = index(&DaemonError::new(*kind, ""));
        assert_eq!(body, i as u8, "{kind:?}");
        assert_eq!(listed[i], format!("{kind:?}"));
    }
}
