//! The platform served from a thread of its own, on a loopback port: for programs that
//! drive it in-process (the demo, tests). Stopping it drops its seeds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::store::{Store, StoreSpec};
use crate::{Config, HostSpec, LoadAware, Platform, Policy};

/// A running platform; stopped on drop.
pub struct Background {
    pub addr: SocketAddr,
    /// The platform itself, for a program that looks inside (its seeds, its instances).
    pub platform: Arc<Platform>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    /// Serves `hosts` on a free loopback port with `config` and an in-memory store.
    pub fn start(config: Config, hosts: Vec<HostSpec>) -> std::io::Result<Background> {
        Self::start_with(config, hosts, &StoreSpec::Memory)
    }

    /// Serves `hosts` (and, with etcd, those other instances registered) with `store`.
    pub fn start_with(
        config: Config,
        hosts: Vec<HostSpec>,
        store: &StoreSpec,
    ) -> std::io::Result<Background> {
        Self::start_with_policy(config, hosts, store, Arc::new(LoadAware::default()))
    }

    /// [`Background::start_with`] with the placement `policy` (a benchmark pins calls to
    /// hosts).
    pub fn start_with_policy(
        config: Config,
        hosts: Vec<HostSpec>,
        store: &StoreSpec,
        policy: Arc<dyn Policy>,
    ) -> std::io::Result<Background> {
        let runtime = tokio::runtime::Runtime::new()?;
        let store = runtime
            .block_on(Store::open_spec(store))
            .map_err(std::io::Error::other)?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        // Made on the runtime: it starts its pollers there.
        let platform =
            runtime.block_on(async { Platform::with_policy(config, store, hosts, policy) });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served_platform = platform.clone();
        let thread = std::thread::spawn(move || {
            let platform = served_platform;
            runtime.block_on(async move {
                let served = axum::serve(listener, crate::api::router(platform.clone()))
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await;
                if let Err(e) = served {
                    tracing::warn!("the API stopped: {e}");
                }
                platform.shutdown().await;
            });
            // Calls still running hold blocking threads; their children end with their
            // connections.
            runtime.shutdown_timeout(Duration::from_secs(2));
        });
        Ok(Background {
            addr,
            platform,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
