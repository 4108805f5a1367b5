//! `mitosis inspect`: what a seed holds and what its children get.

use std::fmt::Write;

use mitosis_descriptor::{Backing, Credentials, Descriptor, Handle, KernelObject, SIG_IGN};
use serde_json::{Value, json};

/// System calls a runtime's threads are commonly blocked in.
fn syscall_name(nr: i64) -> String {
    let name = match nr {
        -1 => return "running user code".into(),
        0 => "read",
        1 => "write",
        7 => "poll",
        23 => "select",
        34 => "pause",
        35 => "nanosleep",
        43 => "accept",
        45 => "recvfrom",
        61 => "wait4",
        128 => "rt_sigtimedwait",
        130 => "rt_sigsuspend",
        202 => "futex",
        219 => "restart_syscall",
        230 => "clock_nanosleep",
        232 => "epoll_wait",
        270 => "pselect6",
        271 => "ppoll",
        281 => "epoll_pwait",
        288 => "accept4",
        441 => "epoll_pwait2",
        _ => return format!("in system call {nr}"),
    };
    format!("in {name}")
}

fn signal_name(sig: u8) -> String {
    nix::sys::signal::Signal::try_from(sig as i32)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("SIG{sig}"))
}

const RLIMIT_NAMES: [&str; 16] = [
    "cpu",
    "fsize",
    "data",
    "stack",
    "core",
    "rss",
    "nproc",
    "nofile",
    "memlock",
    "as",
    "locks",
    "sigpending",
    "msgqueue",
    "nice",
    "rtprio",
    "rttime",
];

fn limit(v: u64) -> String {
    if v == u64::MAX {
        "unlimited".into()
    } else {
        v.to_string()
    }
}

/// A thread's identity and confinement on one line.
fn credentials(c: &Credentials) -> String {
    let ids = |v: &[u32; 4]| v.map(|i| i.to_string()).join("/");
    let groups: Vec<String> = c.groups.iter().map(u32::to_string).collect();
    let k = &c.caps;
    let filters = match c.seccomp.len() {
        0 => "none".to_string(),
        n => {
            let insns: usize = c.seccomp.iter().map(|f| f.program.len()).sum();
            format!("{n} filters ({insns} instructions)")
        }
    };
    format!(
        "uid {} gid {} groups [{}] caps eff {:#x} prm {:#x} inh {:#x} bnd {:#x} amb {:#x} \
         securebits {:#x} no_new_privs {} seccomp {filters}",
        ids(&c.uids),
        ids(&c.gids),
        groups.join(","),
        k.effective,
        k.permitted,
        k.inheritable,
        k.bounding,
        k.ambient,
        c.securebits,
        if c.no_new_privs { "yes" } else { "no" },
    )
}

/// The report, one fact per line. The handle's key stays out of it.
pub fn render(handle: &Handle, d: &Descriptor) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "seed {} ({}) on {}", d.seed_id, d.arch, handle.host);
    if let Some(c) = &d.container {
        let _ = writeln!(w, "container bundle {}", c.bundle);
    }
    if let Some(cwd) = &d.cwd {
        let _ = writeln!(w, "cwd {cwd}");
    }
    let pages: u64 = d.vmas.iter().map(|v| v.seed_pages.len()).sum();
    let files = d
        .vmas
        .iter()
        .filter(|v| matches!(v.backing, Backing::File { .. }))
        .count();
    let _ = writeln!(
        w,
        "memory {} mappings ({files} of files), {pages} pages from the seed",
        d.vmas.len()
    );
    let _ = writeln!(w, "threads {}", d.threads.len());
    for (i, t) in d.threads.iter().enumerate() {
        let mut facts = vec![syscall_name(t.in_syscall)];
        if t.sigmask != 0 {
            facts.push(format!("sigmask {:#x}", t.sigmask));
        }
        if t.rseq.is_some() {
            facts.push("rseq".into());
        }
        if t.robust_list.is_some() {
            facts.push("robust list".into());
        }
        if let Some(s) = t.altstack {
            facts.push(format!("altstack {:#x}+{:#x}", s.sp, s.size));
        }
        let main = if i == 0 { " (main)" } else { "" };
        let _ = writeln!(w, "  thread {}{main}: {}", t.tid, facts.join(", "));
        let _ = writeln!(w, "    {}", credentials(&t.creds));
    }
    let _ = writeln!(w, "umask {:03o}", d.process.umask);
    let _ = writeln!(w, "dumpable {}", d.process.dumpable);
    for a in &d.process.sigactions {
        let what = if a.handler == SIG_IGN {
            "ignored".to_string()
        } else {
            format!("handler {:#x}", a.handler)
        };
        let _ = writeln!(w, "signal {} {what}", signal_name(a.signal));
    }
    for r in &d.process.rlimits {
        let name = RLIMIT_NAMES.get(r.resource as usize).unwrap_or(&"?");
        let _ = writeln!(w, "rlimit {name} {} {}", limit(r.soft), limit(r.hard));
    }
    let _ = writeln!(w, "carried descriptors:");
    for f in &d.files {
        let _ = writeln!(w, "  fd {} file {} at offset {}", f.fd, f.path, f.offset);
    }
    for o in &d.objects {
        let detail = object_detail(o);
        let fds: Vec<String> = o.fds().map(|f| f.fd.to_string()).collect();
        let _ = writeln!(w, "  fd {} {} {detail}", fds.join(","), o.kind());
    }
    let _ = writeln!(w, "closed in children:");
    for f in &d.dropped {
        let _ = writeln!(w, "  fd {} {}: {}", f.fd, f.target, f.reason);
    }
    out
}

/// What one carried kernel object holds, in a few words.
fn object_detail(o: &KernelObject) -> String {
    match o {
        KernelObject::Device { path, .. } => path.clone(),
        KernelObject::Pipe { content, size, .. } => {
            format!("{} bytes buffered of {size}", content.len())
        }
        KernelObject::MemFile {
            name,
            content,
            mappings,
            ..
        } => format!(
            "{name}, {} bytes, {} shared mappings",
            content.len(),
            mappings.len()
        ),
        KernelObject::EventFd { count, .. } => format!("count {count}"),
        KernelObject::Epoll { watches, .. } => {
            let fds: Vec<String> = watches.iter().map(|w| w.fd.to_string()).collect();
            format!("watching fds [{}]", fds.join(", "))
        }
        KernelObject::SocketPair { kind, ends } => {
            let kind = match *kind {
                libc::SOCK_STREAM => "stream",
                libc::SOCK_DGRAM => "datagram",
                _ => "seqpacket",
            };
            let queued: Vec<String> = ends
                .iter()
                .map(|e| {
                    let bytes: usize = e.queued.iter().map(Vec::len).sum();
                    let fds: Vec<String> = e.fds.iter().map(|f| f.fd.to_string()).collect();
                    format!("{} bytes queued at fd {}", bytes, fds.join(","))
                })
                .collect();
            format!("{kind}, {}", queued.join(", "))
        }
        KernelObject::TimerFd {
            clock,
            value_ns,
            interval_ns,
            ..
        } => match value_ns {
            0 => format!("clock {clock}, disarmed"),
            v => format!(
                "clock {clock}, next in {:.3} s, every {:.3} s",
                *v as f64 / 1e9,
                *interval_ns as f64 / 1e9
            ),
        },
        KernelObject::SignalFd { mask, .. } => {
            let names: Vec<String> = (1..=64u8)
                .filter(|s| mask & (1u64 << (s - 1)) != 0)
                .map(signal_name)
                .collect();
            format!("taking {}", names.join(","))
        }
    }
}

/// The report as one JSON object (docs/schemas/inspect.schema.json). The key stays out.
pub fn json(handle: &Handle, d: &Descriptor) -> Value {
    let threads: Vec<Value> = d
        .threads
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let c = &t.creds;
            json!({
                "tid": t.tid,
                "name": t.name,
                "main": i == 0,
                "state": syscall_name(t.in_syscall),
                "in_syscall": t.in_syscall,
                "sigmask": t.sigmask,
                "rseq": t.rseq.is_some(),
                "robust_list": t.robust_list.is_some(),
                "altstack": t.altstack.map(|s| json!({"sp": s.sp, "size": s.size})),
                "credentials": {
                    "uids": c.uids,
                    "gids": c.gids,
                    "groups": c.groups,
                    "caps": {
                        "effective": c.caps.effective,
                        "permitted": c.caps.permitted,
                        "inheritable": c.caps.inheritable,
                        "bounding": c.caps.bounding,
                        "ambient": c.caps.ambient,
                    },
                    "securebits": c.securebits,
                    "no_new_privs": c.no_new_privs,
                    "seccomp_filters": c.seccomp.len(),
                    "seccomp_instructions": c.seccomp.iter().map(|f| f.program.len()).sum::<usize>(),
                },
            })
        })
        .collect();
    let limit = |v: u64| (v != u64::MAX).then_some(v);
    json!({
        "seed_id": d.seed_id,
        "host": handle.host.to_string(),
        "arch": d.arch,
        "container_bundle": d.container.as_ref().map(|c| c.bundle.clone()),
        "cwd": d.cwd,
        "memory": {
            "mappings": d.vmas.len(),
            "file_mappings": d.vmas.iter().filter(|v| matches!(v.backing, Backing::File { .. })).count(),
            "seed_pages": d.vmas.iter().map(|v| v.seed_pages.len()).sum::<u64>(),
        },
        "threads": threads,
        "umask": d.process.umask,
        "dumpable": d.process.dumpable,
        "signals": d.process.sigactions.iter().map(|a| json!({
            "signal": signal_name(a.signal),
            "number": a.signal,
            "disposition": if a.handler == SIG_IGN { "ignored" } else { "handler" },
            "handler": (a.handler != SIG_IGN).then_some(a.handler),
        })).collect::<Vec<_>>(),
        "rlimits": d.process.rlimits.iter().map(|r| json!({
            "resource": RLIMIT_NAMES.get(r.resource as usize).unwrap_or(&"?"),
            "soft": limit(r.soft),
            "hard": limit(r.hard),
        })).collect::<Vec<_>>(),
        "files": d.files.iter().map(|f| json!({
            "fd": f.fd, "path": f.path, "offset": f.offset,
        })).collect::<Vec<_>>(),
        "objects": d.objects.iter().map(|o| json!({
            "fds": o.fds().map(|f| f.fd).collect::<Vec<_>>(),
            "kind": o.kind(),
            "detail": object_detail(o),
        })).collect::<Vec<_>>(),
        "closed": d.dropped.iter().map(|f| json!({
            "fd": f.fd, "target": f.target, "reason": f.reason,
        })).collect::<Vec<_>>(),
    })
}
