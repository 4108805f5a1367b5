//! Register conversions and the system-call restart rules.

use mitosis_descriptor::REGS_WORDS;
use mitosis_sys::ptrace::Regs;

const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;
const ERESTART_RESTARTBLOCK: i64 = 516;

/// Which task the registers will run in: the kernel's restart block belongs to one task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartFor {
    SameTask,
    OtherTask,
}

/// Registers that resume user code where it was, with an interrupted system call set up to run
/// again (as the kernel would have done on return to user space).
///
/// A process stopped inside `read(0)` has rax = -ERESTARTSYS and rip after the `syscall`
/// instruction; rewinding rip and restoring the call number makes it read again, which is how a
/// child reads *its own* stdin.
pub fn resume_point(regs: &Regs, target: RestartFor) -> Regs {
    let mut r = *regs;
    if (r.orig_rax as i64) >= 0 {
        match -(r.rax as i64) {
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
                r.rax = r.orig_rax;
                r.rip -= 2;
            }
            ERESTART_RESTARTBLOCK => {
                r.rax = match target {
                    RestartFor::SameTask => libc::SYS_restart_syscall as u64,
                    // Another task has no restart block: run the original call again.
                    RestartFor::OtherTask => r.orig_rax,
                };
                r.rip -= 2;
            }
            _ => {}
        }
    }
    // Not inside a system call any more: the kernel must not restart anything itself.
    r.orig_rax = u64::MAX;
    r
}

pub fn regs_to_words(r: &Regs) -> Vec<u64> {
    vec![
        r.r15, r.r14, r.r13, r.r12, r.rbp, r.rbx, r.r11, r.r10, r.r9, r.r8, r.rax, r.rcx, r.rdx,
        r.rsi, r.rdi, r.orig_rax, r.rip, r.cs, r.eflags, r.rsp, r.ss, r.fs_base, r.gs_base, r.ds,
        r.es, r.fs, r.gs,
    ]
}

/// Inverse of [`regs_to_words`]; `w` must hold [`REGS_WORDS`] words (the decoder checks).
pub fn words_to_regs(w: &[u64]) -> Regs {
    assert_eq!(w.len(), REGS_WORDS);
    Regs {
        r15: w[0],
        r14: w[1],
        r13: w[2],
        r12: w[3],
        rbp: w[4],
        rbx: w[5],
        r11: w[6],
        r10: w[7],
        r9: w[8],
        r8: w[9],
        rax: w[10],
        rcx: w[11],
        rdx: w[12],
        rsi: w[13],
        rdi: w[14],
        orig_rax: w[15],
        rip: w[16],
        cs: w[17],
        eflags: w[18],
        rsp: w[19],
        ss: w[20],
        fs_base: w[21],
        gs_base: w[22],
        ds: w[23],
        es: w[24],
        fs: w[25],
        gs: w[26],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_read() -> Regs {
        // SAFETY: user_regs_struct is plain integers; all-zero is valid.
        let mut r: Regs = unsafe { std::mem::zeroed() };
        r.orig_rax = 0;
        r.rax = (-ERESTARTSYS) as u64;
        r.rip = 0x1002;
        r
    }

    #[test]
    fn interrupted_read_is_restarted() {
        let r = resume_point(&in_read(), RestartFor::OtherTask);
        assert_eq!((r.rax, r.rip, r.orig_rax), (0, 0x1000, u64::MAX));
    }

    #[test]
    fn restart_block_differs_per_task() {
        let mut r = in_read();
        r.orig_rax = 230; // clock_nanosleep
        r.rax = (-ERESTART_RESTARTBLOCK) as u64;
        assert_eq!(
            resume_point(&r, RestartFor::SameTask).rax,
            libc::SYS_restart_syscall as u64
        );
        assert_eq!(resume_point(&r, RestartFor::OtherTask).rax, 230);
    }

    #[test]
    fn finished_calls_and_user_code_are_untouched() {
        let mut r = in_read();
        r.rax = 5; // read returned 5 bytes
        let out = resume_point(&r, RestartFor::OtherTask);
        assert_eq!((out.rax, out.rip), (5, 0x1002));
        let mut user = in_read();
        user.orig_rax = u64::MAX;
        assert_eq!(resume_point(&user, RestartFor::OtherTask).rip, 0x1002);
    }

    #[test]
    fn words_round_trip() {
        let mut r = in_read();
        r.fs_base = 0xdead;
        r.r15 = 1;
        r.gs = 2;
        let back = words_to_regs(&regs_to_words(&r));
        assert_eq!(regs_to_words(&back), regs_to_words(&r));
    }
}
