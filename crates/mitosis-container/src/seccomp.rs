//! A bundle's seccomp profile (`linux.seccomp`), compiled with libseccomp as runc and youki
//! compile it, and loaded by the seed's init between fork and exec. Children carry the seed's
//! filters as its credentials (`PTRACE_SECCOMP_GET_FILTER` at prepare), so they never get
//! fewer restrictions than their seed.
//!
//! As runc does: a rule whose action is the default one is left out (libseccomp refuses it),
//! a syscall this libseccomp does not know is skipped, several conditions on one argument
//! make one rule each (libseccomp would AND them; OCI means any), and libseccomp's own
//! no_new_privs is off (the config's `noNewPrivileges` decides). Refused: notification
//! (`SCMP_ACT_NOTIFY`, a listener), which no child could keep.

use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};
use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompFilterFlag,
    LinuxSeccompOperator,
};

/// `EPERM`, the errno runc returns for `SCMP_ACT_ERRNO` without `errnoRet`.
const DEFAULT_ERRNO: u32 = libc::EPERM as u32;

/// Compiles `profile` into a filter context, ready to load; errors name what is wrong.
pub fn compile(profile: &LinuxSeccomp) -> Result<ScmpFilterContext, String> {
    if profile
        .listener_path()
        .as_ref()
        .is_some_and(|p| !p.as_os_str().is_empty())
    {
        return Err("linux.seccomp.listenerPath (user notification)".into());
    }
    let default = action(profile.default_action(), profile.default_errno_ret())?;
    fn libseccomp(what: &'static str) -> impl Fn(libseccomp::error::SeccompError) -> String {
        move |e| format!("{what}: {e}")
    }
    let mut ctx = ScmpFilterContext::new(default).map_err(libseccomp("seccomp_init"))?;
    ctx.set_ctl_nnp(false)
        .map_err(libseccomp("no_new_privs off"))?;
    for arch in profile.architectures().iter().flatten() {
        let Some(arch) = scmp_arch(*arch) else {
            continue;
        };
        if !ctx.is_arch_present(arch).map_err(libseccomp("arch"))? {
            ctx.add_arch(arch).map_err(libseccomp("arch"))?;
        }
    }
    for flag in profile.flags().iter().flatten() {
        match flag {
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => ctx.set_ctl_tsync(true),
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => ctx.set_ctl_log(true),
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => ctx.set_ctl_ssb(true),
        }
        .map_err(libseccomp("flag"))?;
    }
    for rule in profile.syscalls().iter().flatten() {
        let act = action(rule.action(), rule.errno_ret())?;
        if act == default {
            continue;
        }
        let conditions: Vec<ScmpArgCompare> = rule
            .args()
            .iter()
            .flatten()
            .map(condition)
            .collect::<Result<_, _>>()?;
        let mut indices: Vec<usize> = rule.args().iter().flatten().map(|a| a.index()).collect();
        indices.sort_unstable();
        indices.dedup();
        // Conditions on distinct arguments all hold at once; on one argument, any of them.
        let groups: Vec<&[ScmpArgCompare]> = if indices.len() == conditions.len() {
            vec![&conditions]
        } else {
            conditions.chunks(1).collect()
        };
        for name in rule.names() {
            let Ok(syscall) = ScmpSyscall::from_name(name) else {
                tracing::debug!(name, "seccomp: a syscall libseccomp does not know, skipped");
                continue;
            };
            for group in &groups {
                let added = if group.is_empty() {
                    ctx.add_rule(act, syscall)
                } else {
                    ctx.add_rule_conditional(act, syscall, group)
                };
                added.map_err(|e| format!("rule for {name}: {e}"))?;
            }
        }
    }
    Ok(ctx)
}

/// Compiles and loads `profile` on the calling thread.
pub fn load(profile: &LinuxSeccomp) -> Result<(), String> {
    compile(profile)?
        .load()
        .map_err(|e| format!("loading the seccomp filter: {e}"))
}

fn action(a: LinuxSeccompAction, errno: Option<u32>) -> Result<ScmpAction, String> {
    Ok(match a {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            ScmpAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => ScmpAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => ScmpAction::Trap,
        LinuxSeccompAction::ScmpActErrno => {
            let errno = errno.unwrap_or(DEFAULT_ERRNO);
            ScmpAction::Errno(i32::try_from(errno).map_err(|_| format!("errnoRet {errno}"))?)
        }
        LinuxSeccompAction::ScmpActTrace => {
            let errno = errno.unwrap_or(DEFAULT_ERRNO);
            ScmpAction::Trace(u16::try_from(errno).map_err(|_| format!("errnoRet {errno}"))?)
        }
        LinuxSeccompAction::ScmpActLog => ScmpAction::Log,
        LinuxSeccompAction::ScmpActAllow => ScmpAction::Allow,
        LinuxSeccompAction::ScmpActNotify => {
            return Err("linux.seccomp action SCMP_ACT_NOTIFY (user notification)".into());
        }
    })
}

fn condition(arg: &LinuxSeccompArg) -> Result<ScmpArgCompare, String> {
    let index = u32::try_from(arg.index())
        .ok()
        .filter(|&i| i < 6)
        .ok_or_else(|| format!("seccomp argument index {}", arg.index()))?;
    let (op, datum) = match arg.op() {
        LinuxSeccompOperator::ScmpCmpNe => (ScmpCompareOp::NotEqual, arg.value()),
        LinuxSeccompOperator::ScmpCmpLt => (ScmpCompareOp::Less, arg.value()),
        LinuxSeccompOperator::ScmpCmpLe => (ScmpCompareOp::LessOrEqual, arg.value()),
        LinuxSeccompOperator::ScmpCmpEq => (ScmpCompareOp::Equal, arg.value()),
        LinuxSeccompOperator::ScmpCmpGe => (ScmpCompareOp::GreaterEqual, arg.value()),
        LinuxSeccompOperator::ScmpCmpGt => (ScmpCompareOp::Greater, arg.value()),
        // The mask is `value`, the masked argument is compared with `valueTwo`.
        LinuxSeccompOperator::ScmpCmpMaskedEq => (
            ScmpCompareOp::MaskedEqual(arg.value()),
            arg.value_two().unwrap_or(0),
        ),
    };
    Ok(ScmpArgCompare::new(index, op, datum))
}

/// The architectures this x86_64 host can run; others are left out of the filter.
fn scmp_arch(arch: Arch) -> Option<ScmpArch> {
    match arch {
        Arch::ScmpArchNative => Some(ScmpArch::Native),
        Arch::ScmpArchX86_64 => Some(ScmpArch::X8664),
        Arch::ScmpArchX86 => Some(ScmpArch::X86),
        Arch::ScmpArchX32 => Some(ScmpArch::X32),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_profile_as_docker_writes_it_compiles() {
        let p = profile(
            r#"{"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
                "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
                "flags": ["SECCOMP_FILTER_FLAG_LOG"],
                "syscalls": [
                  {"names": ["read", "write", "no_such_syscall"], "action": "SCMP_ACT_ALLOW"},
                  {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                   "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"},
                            {"index": 0, "value": 131072, "op": "SCMP_CMP_EQ"}]},
                  {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                   "args": [{"index": 0, "value": 2114060288, "valueTwo": 0,
                             "op": "SCMP_CMP_MASKED_EQ"}]},
                  {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}
                ]}"#,
        );
        let ctx = compile(&p).unwrap();
        assert!(
            !ctx.get_ctl_nnp().unwrap(),
            "no_new_privs is the config's to set"
        );
        // An empty listener path, as some tools write it, is no listener.
        let quiet = profile(r#"{"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": ""}"#);
        assert!(compile(&quiet).is_ok());
    }

    #[test]
    fn notification_and_bad_arguments_are_refused() {
        for (json, want) in [
            (r#"{"defaultAction": "SCMP_ACT_NOTIFY"}"#, "SCMP_ACT_NOTIFY"),
            (
                r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"],
                    "action": "SCMP_ACT_NOTIFY"}]}"#,
                "SCMP_ACT_NOTIFY",
            ),
            (
                r#"{"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/l.sock"}"#,
                "listenerPath",
            ),
            (
                r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"],
                    "action": "SCMP_ACT_ERRNO", "args": [{"index": 6, "value": 0,
                    "op": "SCMP_CMP_EQ"}]}]}"#,
                "argument index 6",
            ),
        ] {
            let err = compile(&profile(json)).err().unwrap();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }
}
