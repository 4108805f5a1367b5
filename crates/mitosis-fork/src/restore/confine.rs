//! Giving each thread of a child exactly its seed thread's credentials and confinement.
//!
//! A child is forked from the replica, which runs as the daemon (root), so every thread drops
//! to its seed thread's ids, groups, capabilities, securebits, no_new_privs and seccomp
//! filters before it runs a single instruction of the seed's code. The kernel keeps all of
//! these per thread, so each thread does it for itself, at the end of its own batch.
//!
//! Order matters, because each step needs privileges the later ones take away:
//! 1. seccomp filters first, while the thread may still install any (CAP_SYS_ADMIN). The
//!    tracer suspends them for the calls that follow (`PTRACE_O_SUSPEND_SECCOMP`), which a
//!    filter could otherwise refuse; detaching lifts that. Filters every thread shares are
//!    installed once in the main thread before it clones the others, which inherit them.
//! 2. inheritable and ambient capabilities, then the bounding set (needs CAP_SETPCAP);
//! 3. groups and gids, then uids with SECBIT_NO_SETUID_FIXUP (so changing uid does not
//!    clear the capabilities the next steps need);
//! 4. the seed's securebits (needs CAP_SETPCAP), then its capability sets, the last drop;
//! 5. no_new_privs.
//!
//! In the main thread, last: the dumpable flag (a uid change resets it) and the death signal
//! that ties the child to the daemon (a credential change clears it).

use std::io;

use mitosis_descriptor::{Credentials, SeccompFilter, Thread};

use super::batch::{Arg, Batch};

const SECBIT_NO_SETUID_FIXUP: u64 = 1 << 2;
const SECBIT_KEEP_CAPS: u32 = 1 << 4;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_SETPCAP: u32 = 8;
/// Flags a filter can be installed with again (LOG; SPEC_ALLOW).
const REINSTALLABLE_FLAGS: u64 = libc::SECCOMP_FILTER_FLAG_LOG | (1 << 2);

/// The credentials the replica's threads (and so a fresh child's) have: the daemon's.
#[derive(Debug, Clone)]
pub struct HostCreds {
    pub creds: Credentials,
    /// The highest capability this kernel knows.
    pub last_cap: u32,
}

impl HostCreds {
    /// Reads them from process `pid` (a stub: it runs as the daemon), with this process's
    /// securebits (a stub inherits them, less KEEP_CAPS, which exec clears).
    pub fn of(pid: i32) -> io::Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let parsed = crate::capture::creds::parse_status(&status).map_err(io::Error::other)?;
        // SAFETY: PR_GET_SECUREBITS reads no memory; it returns the bits or -1.
        let securebits = unsafe { libc::prctl(libc::PR_GET_SECUREBITS, 0, 0, 0, 0) };
        let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")?
            .trim()
            .parse()
            .map_err(io::Error::other)?;
        Ok(HostCreds {
            creds: Credentials {
                uids: parsed.uids,
                gids: parsed.gids,
                groups: parsed.groups,
                caps: parsed.caps,
                securebits: (securebits.max(0) as u32) & !SECBIT_KEEP_CAPS,
                no_new_privs: parsed.no_new_privs,
                seccomp: Vec::new(),
            },
            last_cap,
        })
    }
}

/// How many of the oldest seccomp filters every thread has in common: the main thread
/// installs those before it clones the others.
pub(crate) fn shared_filters(threads: &[Thread]) -> usize {
    let main = &threads[0].creds.seccomp;
    threads[1..].iter().fold(main.len(), |n, t| {
        main.iter()
            .zip(&t.creds.seccomp)
            .take(n)
            .take_while(|(a, b)| a == b)
            .count()
    })
}

/// True if any thread of the seed has a seccomp filter (the tracer must suspend them).
pub(crate) fn any_filters(threads: &[Thread]) -> bool {
    threads.iter().any(|t| !t.creds.seccomp.is_empty())
}

/// Installs `filters` (the oldest first) in the calling thread.
pub(crate) fn filter_calls(b: &mut Batch, filters: &[SeccompFilter], tid: i32) {
    for (i, f) in filters.iter().enumerate() {
        let program: Vec<u8> = f.program.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let program = b.bytes(&program);
        // struct sock_fprog: u16 len (padded to 8 bytes), then the pointer.
        let fprog = b.words(vec![(f.program.len() as u64).into(), program]);
        b.call(
            libc::SYS_seccomp,
            &[
                (libc::SECCOMP_SET_MODE_FILTER as u64).into(),
                (f.flags & REINSTALLABLE_FLAGS).into(),
                fprog,
            ],
            format!("install seccomp filter {i} of thread {tid}"),
        );
    }
}

fn bit(cap: u32) -> u64 {
    1 << cap
}

fn capset(b: &mut Batch, effective: u64, permitted: u64, inheritable: u64, label: String) {
    let mut header = Vec::with_capacity(8);
    header.extend_from_slice(&LINUX_CAPABILITY_VERSION_3.to_ne_bytes());
    header.extend_from_slice(&0i32.to_ne_bytes());
    let header = b.bytes(&header);
    // Two struct __user_cap_data_struct: the low and the high 32 bits of each set.
    let mut data = Vec::with_capacity(24);
    for half in [0, 32] {
        for set in [effective, permitted, inheritable] {
            data.extend_from_slice(&((set >> half) as u32).to_ne_bytes());
        }
    }
    let data = b.bytes(&data);
    b.call(libc::SYS_capset, &[header, data], label);
}

fn prctl(b: &mut Batch, args: &[u64], label: String) {
    let args: Vec<Arg> = args.iter().map(|&a| a.into()).collect();
    b.call(libc::SYS_prctl, &args, label);
}

/// The calls that take a thread from the host's credentials to `target`'s, the first
/// `installed` of its seccomp filters being there already. None if they are the same.
pub(crate) fn confine_calls(
    b: &mut Batch,
    target: &Credentials,
    host: &HostCreds,
    installed: usize,
    tid: i32,
) {
    filter_calls(b, &target.seccomp[installed..], tid);
    let mut same = target.clone();
    same.seccomp.clear();
    if same == host.creds {
        return;
    }
    let c = &target.caps;
    let label = |what: &str| format!("{what} of thread {tid}");
    // What the steps below need, kept until the last drop.
    let working = c.permitted | bit(CAP_SETGID) | bit(CAP_SETUID) | bit(CAP_SETPCAP);
    capset(
        b,
        working,
        working,
        c.inheritable,
        label("take the seed's inheritable capabilities"),
    );
    let ambient = libc::PR_CAP_AMBIENT as u64;
    prctl(
        b,
        &[ambient, libc::PR_CAP_AMBIENT_CLEAR_ALL as u64, 0, 0, 0],
        label("clear the ambient capabilities"),
    );
    for cap in (0..=host.last_cap.min(63)).filter(|&cap| c.ambient & bit(cap) != 0) {
        prctl(
            b,
            &[ambient, libc::PR_CAP_AMBIENT_RAISE as u64, cap as u64, 0, 0],
            label(&format!("raise ambient capability {cap}")),
        );
    }
    let dropped = host.creds.caps.bounding & !c.bounding;
    for cap in (0..=host.last_cap.min(63)).filter(|&cap| dropped & bit(cap) != 0) {
        prctl(
            b,
            &[libc::PR_CAPBSET_DROP as u64, cap as u64],
            label(&format!("drop capability {cap} from the bounding set")),
        );
    }
    let groups: Vec<u8> = target.groups.iter().flat_map(|g| g.to_ne_bytes()).collect();
    let groups = b.bytes(&groups);
    b.call(
        libc::SYS_setgroups,
        &[(target.groups.len() as u64).into(), groups],
        label("set the supplementary groups"),
    );
    let [rgid, egid, sgid, fsgid] = target.gids.map(u64::from);
    b.call(
        libc::SYS_setresgid,
        &[rgid.into(), egid.into(), sgid.into()],
        label("set the group ids"),
    );
    b.call(libc::SYS_setfsgid, &[fsgid.into()], label("set the fs gid"));
    // setfsgid answers the previous id whatever happened: asking again with an invalid id
    // changes nothing and answers the current one, which must be the seed's.
    b.call_expecting(
        libc::SYS_setfsgid,
        &[(u32::MAX as u64).into()],
        fsgid,
        label("check the fs gid"),
    );
    let securebits = libc::PR_SET_SECUREBITS as u64;
    prctl(
        b,
        &[
            securebits,
            host.creds.securebits as u64 | SECBIT_NO_SETUID_FIXUP,
        ],
        label("keep capabilities across the uid change"),
    );
    let [ruid, euid, suid, fsuid] = target.uids.map(u64::from);
    b.call(
        libc::SYS_setresuid,
        &[ruid.into(), euid.into(), suid.into()],
        label("set the user ids"),
    );
    b.call(libc::SYS_setfsuid, &[fsuid.into()], label("set the fs uid"));
    b.call_expecting(
        libc::SYS_setfsuid,
        &[(u32::MAX as u64).into()],
        fsuid,
        label("check the fs uid"),
    );
    prctl(
        b,
        &[securebits, target.securebits as u64],
        label("set the seed's securebits"),
    );
    capset(
        b,
        c.effective,
        c.permitted,
        c.inheritable,
        label("set the seed's capabilities"),
    );
    if target.no_new_privs {
        prctl(
            b,
            &[libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0],
            label("set no_new_privs"),
        );
    }
}

/// The main thread's last calls: the dumpable flag (a uid change resets it; the kernel takes
/// only 0 and 1, so 2, "root only", becomes 0) and the death signal that ties the child to
/// the daemon, which a credential change clears.
pub(crate) fn finish_calls(b: &mut Batch, dumpable: u8) {
    prctl(
        b,
        &[libc::PR_SET_DUMPABLE as u64, (dumpable == 1) as u64],
        "set the dumpable flag".into(),
    );
    prctl(
        b,
        &[libc::PR_SET_PDEATHSIG as u64, libc::SIGKILL as u64],
        "die with the daemon".into(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread_with(filters: &[u64]) -> Thread {
        let mut t = Thread {
            tid: 1,
            name: String::new(),
            regs: vec![0; mitosis_descriptor::REGS_WORDS],
            xstate: vec![],
            sigmask: 0,
            rseq: None,
            robust_list: None,
            tid_address: 0,
            tid_cache: 0,
            own_tid: 0,
            altstack: None,
            in_syscall: -1,
            creds: Default::default(),
            timer_slack_ns: 50_000,
            pdeathsig: 0,
            pending: vec![],
        };
        t.creds.seccomp = filters
            .iter()
            .map(|&k| SeccompFilter {
                program: vec![k],
                flags: 0,
            })
            .collect();
        t
    }

    #[test]
    fn threads_share_their_common_oldest_filters() {
        let same = [thread_with(&[1, 2]), thread_with(&[1, 2])];
        assert_eq!(shared_filters(&same), 2);
        // The main thread installed one more after starting the worker.
        let main_more = [thread_with(&[1, 2, 3]), thread_with(&[1, 2])];
        assert_eq!(shared_filters(&main_more), 2);
        let differ = [
            thread_with(&[1, 2]),
            thread_with(&[1, 4]),
            thread_with(&[1]),
        ];
        assert_eq!(shared_filters(&differ), 1);
        assert_eq!(shared_filters(&[thread_with(&[5])]), 1);
        assert!(!any_filters(&[thread_with(&[])]));
    }

    fn host() -> HostCreds {
        HostCreds {
            creds: Credentials {
                caps: mitosis_descriptor::Capabilities {
                    effective: (1 << 41) - 1,
                    permitted: (1 << 41) - 1,
                    bounding: (1 << 41) - 1,
                    ..Default::default()
                },
                ..Default::default()
            },
            last_cap: 40,
        }
    }

    #[test]
    fn the_hosts_own_credentials_need_no_calls() {
        let h = host();
        let mut b = Batch::default();
        confine_calls(&mut b, &h.creds, &h, 0, 1);
        assert_eq!(b.count(), 0);
    }

    #[test]
    fn an_unprivileged_seed_drops_everything_in_order() {
        let h = host();
        let target = Credentials {
            uids: [65534; 4],
            gids: [65534; 4],
            no_new_privs: true,
            seccomp: vec![SeccompFilter {
                program: vec![6],
                flags: 0,
            }],
            ..Default::default()
        };
        let mut b = Batch::default();
        confine_calls(&mut b, &target, &h, 0, 1);
        let labels = b.labels();
        let at = |what: &str| {
            labels
                .iter()
                .position(|l| l.starts_with(what))
                .unwrap_or_else(|| panic!("no {what:?} in {labels:?}"))
        };
        assert!(at("install seccomp filter") < at("take the seed's inheritable"));
        assert!(at("drop capability 40 from the bounding set") < at("set the user ids"));
        assert!(at("set the group ids") < at("set the user ids"));
        assert!(at("keep capabilities") < at("set the user ids"));
        assert!(at("set the user ids") < at("set the seed's capabilities"));
        assert!(at("set the seed's capabilities") < at("set no_new_privs"));
        // Every capability in the host's bounding set is dropped.
        assert_eq!(
            labels.iter().filter(|l| l.contains("bounding set")).count(),
            41
        );
    }
}
