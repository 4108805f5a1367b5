//! The position-independent code a child runs while its own address space is replaced.
//!
//! Once the stub has opened its files it jumps here: this loop runs a list of system calls
//! (unmap everything else, map the seed's layout, read the bootstrap pages, place the vDSO,
//! set the mm fields, close the stub's fds) without touching the stack or any memory outside
//! its own page, then stops on `int3` for the tracer. A call fails on an errno, or when it
//! returns other than the result its record expects (a read that came short). A second entry
//! is a lone `syscall; int3` for calls the tracer injects.

use std::arch::global_asm;

/// One system call: number, six arguments, and the result it must return ([`ANY`]: any
/// result that is not an errno).
pub type Record = [u64; 8];

/// A record's expected result when every success will do.
pub const ANY: u64 = u64::MAX;

global_asm!(
    ".pushsection .text.mitosis_trampoline,\"ax\",@progbits",
    ".globl mitosis_trampoline_start",
    "mitosis_trampoline_start:",
    // rdi = records, rsi = count. rbx walks the records, r12 counts down what is left, so on
    // the final int3 the tracer reads r12 = 0 for success, or the failed call's position.
    "  mov rbx, rdi",
    "  mov r12, rsi",
    "2:",
    "  test r12, r12",
    "  jz 3f",
    "  mov rax, [rbx]",
    "  mov rdi, [rbx + 8]",
    "  mov rsi, [rbx + 16]",
    "  mov rdx, [rbx + 24]",
    "  mov r10, [rbx + 32]",
    "  mov r8, [rbx + 40]",
    "  mov r9, [rbx + 48]",
    "  syscall",
    // -4095..-1 is an errno.
    "  cmp rax, -4095",
    "  jae 3f",
    // rcx is the syscall's scratch register: free to hold the expected result.
    "  mov rcx, [rbx + 56]",
    "  cmp rcx, -1",
    "  je 4f",
    "  cmp rax, rcx",
    "  jne 3f",
    "4:",
    "  add rbx, 64",
    "  dec r12",
    "  jmp 2b",
    "3:",
    "  int3",
    ".globl mitosis_trampoline_syscall",
    "mitosis_trampoline_syscall:",
    "  syscall",
    "  int3",
    ".globl mitosis_trampoline_end",
    "mitosis_trampoline_end:",
    ".popsection",
);

unsafe extern "C" {
    static mitosis_trampoline_start: u8;
    static mitosis_trampoline_syscall: u8;
    static mitosis_trampoline_end: u8;
}

/// The machine code, to be copied to a page of the child.
pub fn code() -> &'static [u8] {
    // SAFETY: the three symbols delimit the instructions emitted above, in one text section that is mapped readable for the life of the program.
    unsafe {
        let start = &raw const mitosis_trampoline_start;
        let end = &raw const mitosis_trampoline_end;
        std::slice::from_raw_parts(start, end.offset_from(start) as usize)
    }
}

/// Offset of the lone `syscall` instruction within [`code`].
pub fn syscall_offset() -> u64 {
    // SAFETY: both symbols are in the same section emitted above; only addresses are taken.
    unsafe {
        (&raw const mitosis_trampoline_syscall).offset_from(&raw const mitosis_trampoline_start)
            as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_ends_in_syscall_int3() {
        let code = code();
        let off = syscall_offset() as usize;
        assert_eq!(&code[off..], &[0x0f, 0x05, 0xcc]);
        assert!(code.len() < 4096);
    }
}
