//! Capturing what crosses a simulated host's network.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::in_netns;

/// Every packet seen in a host's network namespace (an AF_PACKET socket), until stopped.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Captured>,
}

pub struct Captured {
    pub packets: Vec<Vec<u8>>,
    pub truncated: usize,
    pub drops: u32,
}

impl Capture {
    pub fn start(host: &mitosis_testbed::Host) -> Capture {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready, started) = std::sync::mpsc::channel();
        let thread = in_netns(host, {
            let stop = stop.clone();
            move || {
                let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
                // SAFETY: creates a socket; the fd is checked and closed below.
                let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
                assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
                let set = |level, name, value: &[u8]| {
                    // SAFETY: `value` is valid for its length during the call.
                    let r = unsafe {
                        libc::setsockopt(fd, level, name, value.as_ptr().cast(), value.len() as u32)
                    };
                    assert_eq!(r, 0, "setsockopt: {}", std::io::Error::last_os_error());
                };
                set(
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    &(64i32 << 20).to_ne_bytes(),
                );
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 50_000,
                };
                // SAFETY: a timeval is plain data; viewed as its bytes for setsockopt.
                let tv_bytes = unsafe {
                    std::slice::from_raw_parts(
                        (&tv as *const libc::timeval).cast::<u8>(),
                        size_of::<libc::timeval>(),
                    )
                };
                set(libc::SOL_SOCKET, libc::SO_RCVTIMEO, tv_bytes);
                ready.send(()).unwrap();
                let mut out = Captured {
                    packets: Vec::new(),
                    truncated: 0,
                    drops: 0,
                };
                let mut buf = vec![0u8; 256 << 10];
                loop {
                    // SAFETY: `buf` is valid for its length; MSG_TRUNC returns the real size.
                    let n = unsafe {
                        libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_TRUNC)
                    };
                    if n < 0 {
                        // Timed out: stop once asked to and the queue is empty.
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        continue;
                    }
                    let n = n as usize;
                    if n > buf.len() {
                        out.truncated += 1;
                    }
                    out.packets.push(buf[..n.min(buf.len())].to_vec());
                }
                let mut stats = libc::tpacket_stats {
                    tp_packets: 0,
                    tp_drops: 0,
                };
                let mut len = size_of::<libc::tpacket_stats>() as u32;
                // SAFETY: `stats` and `len` are valid out-pointers for PACKET_STATISTICS.
                let r = unsafe {
                    libc::getsockopt(
                        fd,
                        libc::SOL_PACKET,
                        libc::PACKET_STATISTICS,
                        (&mut stats as *mut libc::tpacket_stats).cast(),
                        &mut len,
                    )
                };
                assert_eq!(r, 0, "PACKET_STATISTICS");
                out.drops = stats.tp_drops;
                // SAFETY: our socket, closed once.
                unsafe { libc::close(fd) };
                out
            }
        });
        started.recv().expect("the capture starts");
        Capture { stop, thread }
    }

    pub fn finish(self) -> Captured {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the capture")
    }
}
