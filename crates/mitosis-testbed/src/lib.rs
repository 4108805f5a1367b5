//! A simulated multi-host network for testing mitosis on one machine.
//!
//! A [`Testbed`] is a set of hosts, each a Linux network namespace with an
//! `eth0` at 10.77.0.(i+1)/24. The hosts' veth peers are joined by a bridge
//! in a dedicated "switch" namespace, so nothing but the namespace files under
//! /run/netns is created in the root namespace, and every testbed can reuse
//! the same subnet. Each host can run a daemon; processes are started inside
//! a host with [`Host::command`].
//!
//! Building a testbed needs root and iproute2's `ip`.
//!
//! ```no_run
//! use mitosis_testbed::{Testbed, TestbedConfig};
//!
//! let testbed = Testbed::new(TestbedConfig::new(2))?;
//! let status = testbed
//!     .host(0)
//!     .command("ip")
//!     .args(["addr", "show", "eth0"])
//!     .status()
//!     .expect("ip runs");
//! assert!(status.success());
//! testbed.teardown()?;
//! # Ok::<(), mitosis_testbed::TestbedError>(())
//! ```

mod error;
mod host;
mod leak;
pub mod lines;
mod netns;
#[cfg(feature = "tls")]
pub mod pki;
pub mod redis;
mod testbed;

pub use error::{Result, TestbedError};
pub use host::{DaemonConfig, Host, TESTBED_ID_ENV};
pub use leak::{Leftover, leftovers};
pub use netns::Dialer;
pub use testbed::{ID_PREFIX, MAX_HOSTS, Testbed, TestbedConfig, host_addr};
