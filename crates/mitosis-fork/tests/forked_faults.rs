//! The fault path of a process that a served process forks (as root). A test binary of its
//! own: it forks itself, and counts its own userfaultfds.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mitosis_fork::fault::{FaultStats, serve};
use mitosis_fork::pending::PendingMap;
use mitosis_fork::restore::UFFD_FEATURES;
use mitosis_fork::{PageSource, SourceError};
use mitosis_sys::PAGE_SIZE;
use mitosis_sys::uffd::Userfaultfd;

const PAGES: usize = 8;
const SEED: u64 = 0x5000_0000;

/// The seed's page at address `a` holds the byte `a >> 12` (truncated) throughout.
struct Pattern {
    lost: bool,
}

impl PageSource for Pattern {
    async fn read(
        &mut self,
        runs: Vec<(u64, u32)>,
        _: Option<u64>,
    ) -> Result<Vec<u8>, SourceError> {
        if self.lost {
            return Err(SourceError::Gone("the seed's host is gone".into()));
        }
        Ok(runs
            .iter()
            .flat_map(|&(at, pages)| (0..pages as u64).map(move |i| (at >> 12) + i))
            .flat_map(|page| vec![page as u8; PAGE_SIZE as usize])
            .collect())
    }

    async fn duplicate(&self) -> Result<Self, SourceError> {
        Ok(Pattern { lost: self.lost })
    }
}

/// Our userfaultfds: the handlers of forked processes hold theirs until those are gone.
fn uffds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|t| t.to_str() == Some("anon_inode:[userfaultfd]"))
        .count()
}

/// Registers a region of ours whose pages are all the seed's and serves it as a child's, then
/// forks: the forked process reads the region, which this process never touches, so each page
/// is a fault on the forked process's own userfaultfd. Returns what it read (the first byte of
/// each page), its wait status, and whether its userfaultfd was closed after it.
fn fork_and_read(lost: bool) -> (Vec<u8>, libc::c_int, bool) {
    let len = PAGES * PAGE_SIZE as usize;
    // SAFETY: a fresh private anonymous mapping nobody else knows of.
    let region = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(region, libc::MAP_FAILED);
    let uffd = Userfaultfd::create().expect("userfaultfd (run as root)");
    uffd.handshake(UFFD_FEATURES).unwrap();
    uffd.register(region as u64, len as u64).unwrap();
    let mut pending = PendingMap::new();
    pending.insert(region as u64, SEED, vec![true; PAGES]);
    // The fork below waits until a handler reads its event: handlers run on a thread of their
    // own.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let stats = Arc::new(Mutex::new(FaultStats::default()));
    let pid = std::process::id() as i32;
    let handler = rt.spawn(serve(uffd, pid, pending, Pattern { lost }, stats));
    // The forked process's userfaultfd comes on top of these.
    let before = uffds();

    let mut pipe = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    let piped = unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(piped, 0);
    // A bare clone, not libc's fork: fork holds the allocator's locks until the kernel's fork
    // returns, which waits for the handler, which allocates, in this very process.
    // SAFETY: the new process, on a copy of this stack, only reads memory and calls write and _exit, and allocates nothing.
    let child = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) } as i32;
    if child == 0 {
        let mut firsts = [0u8; PAGES];
        for (page, first) in firsts.iter_mut().enumerate() {
            // SAFETY: reading the region, mapped above, at one byte of each page.
            *first = unsafe {
                std::ptr::read_volatile(region.cast::<u8>().add(page * PAGE_SIZE as usize))
            };
        }
        // SAFETY: writing our own buffer to our end of the pipe, then leaving at once.
        unsafe {
            libc::write(pipe[1], firsts.as_ptr().cast(), PAGES);
            libc::_exit(0);
        }
    }
    assert!(child > 0, "clone: {}", std::io::Error::last_os_error());
    // SAFETY: closing our copy of the write end, so that the read below ends.
    unsafe { libc::close(pipe[1]) };
    let mut read = vec![0u8; PAGES];
    let mut poll = libc::pollfd {
        fd: pipe[0],
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd; a hung child would hang the test without its timeout.
    let ready = unsafe { libc::poll(&mut poll, 1, 10_000) };
    assert_eq!(ready, 1, "the child hangs");
    // SAFETY: reading into our buffer of PAGES bytes.
    let n = unsafe { libc::read(pipe[0], read.as_mut_ptr().cast(), PAGES) };
    read.truncate(n.max(0) as usize);
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
    // SAFETY: closing the read end, ours.
    unsafe { libc::close(pipe[0]) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while uffds() > before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let closed = uffds() == before;
    assert!(!handler.is_finished(), "the parent's handler runs on");
    handler.abort();
    drop(rt);
    // SAFETY: the region is ours and nothing refers to it any more.
    assert_eq!(unsafe { libc::munmap(region, len) }, 0);
    (read, status, closed)
}

/// Both cases in one test, one after the other: each counts this process's userfaultfds.
#[test]
fn a_forked_process_faults_through_a_handler_of_its_own() {
    let (read, status, closed) = fork_and_read(false);
    let want: Vec<u8> = (0..PAGES as u64)
        .map(|i| ((SEED >> 12) + i) as u8)
        .collect();
    assert_eq!(read, want, "the seed's pages");
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    assert!(closed, "its handler ended with it");

    // When the source is lost, the forked process is killed, neither handed zeros nor left
    // waiting; its userfaultfd is closed once it is dead.
    let (read, status, closed) = fork_and_read(true);
    assert!(read.is_empty(), "it read {read:?}");
    assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL);
    assert!(closed, "its handler ended with it");
}
