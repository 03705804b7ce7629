//! Starting and stopping a whole node: store, network, engine and local API.
//!
//! [`start`] brings the parts up in dependency order and returns a [`RunningNode`];
//! [`RunningNode::shutdown`] takes them down in reverse, so the engine has closed the store
//! before the process exits. [`run`] is `kith run`: start, then wait for Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::NodeConfig;
use crate::datadir::{self, DataDirError, Recovery};
use crate::engine::{self, EngineError, EngineHandle, EngineTask};
use crate::identity::{self, IdentityError};
use crate::metrics::{self, KithMetrics};
use crate::net::{self, NetConfig, NetError, NetHandle};

/// How long shutdown waits for the file store's last users (a disk read, a fsync) to end.
const FILE_STORE_CLOSE_WAIT: Duration = Duration::from_secs(30);
/// Gossipsub heartbeat used unless overridden.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(700);

/// Everything needed to start a node.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The data directory (key, config, database, API token and address).
    pub data_dir: PathBuf,
    /// Validated configuration.
    pub config: NodeConfig,
    /// Gossipsub heartbeat interval.
    pub heartbeat: Duration,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The node key or API token could not be read or created.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The node key and the database do not belong together, or cannot be opened.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// The network could not start (e.g. a listen address is in use).
    #[error(transparent)]
    Net(#[from] NetError),
    /// The group state could not be loaded.
    #[error("cannot load groups: {0}")]
    Engine(#[from] EngineError),
    /// The API address could not be bound.
    #[error("cannot bind the local API on {addr}: {source}")]
    Api {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The metrics address could not be bound.
    #[error("cannot bind the metrics endpoint on {addr}: {source}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// `KITH_CRASH_AT` (crash tests only) is set to something unusable.
    #[error(transparent)]
    CrashPoint(#[from] crate::crashpoint::CrashPointError),
    /// The file store (`files/` in the data directory) could not be opened.
    #[error("cannot open the file store: {0}")]
    Files(crate::files::BlobError),
}

/// A node that is up.
pub struct RunningNode {
    /// Handle to the engine (the API's backend).
    pub engine: EngineHandle,
    /// Handle to the network task.
    pub net: NetHandle,
    /// Where the local API listens.
    pub api_addr: SocketAddr,
    /// The API bearer token.
    pub api_token: String,
    /// This node's PeerId.
    pub peer_id: PeerId,
    /// Where `GET /metrics` is served, if metrics are on.
    pub metrics_addr: Option<SocketAddr>,
    /// Kith's metrics (counted whether or not they are served).
    pub metrics: Arc<KithMetrics>,
    data_dir: PathBuf,
    engine_task: EngineTask,
    api_stop: oneshot::Sender<()>,
    api_task: JoinHandle<std::io::Result<()>>,
    metrics_server: Option<(oneshot::Sender<()>, JoinHandle<std::io::Result<()>>)>,
}

/// Starts a node. Must be called inside a multi-threaded tokio runtime.
pub async fn start(opts: NodeOptions) -> Result<RunningNode, StartError> {
    start_with(opts, Recovery::Refuse).await
}

/// [`start`], with what the start check may set aside when the node key and the database do
/// not belong together (`kith run --fresh-database` / `--new-identity`; see
/// [`crate::datadir`]).
pub async fn start_with(opts: NodeOptions, recovery: Recovery) -> Result<RunningNode, StartError> {
    let NodeOptions {
        data_dir,
        config,
        heartbeat,
    } = opts;
    crate::crashpoint::arm_from_env()?;
    let datadir::Opened {
        keypair,
        created_key,
        store,
        ..
    } = datadir::open(&data_dir, recovery)?;
    let peer_id = keypair.public().to_peer_id();
    if created_key {
        tracing::info!(%peer_id, dir = %data_dir.display(), "created a new node key");
    }
    let known_peers = store.peers().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read the address book; starting without it");
        Vec::new()
    });
    // Kith's metrics are always counted (atomics); libp2p's are only recorded, and the
    // registry only served, when metrics are on.
    let mut registry = Registry::default();
    let kith_metrics = Arc::new(KithMetrics::register(&mut registry));
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some((
            addr,
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Metrics { addr, source })?,
        )),
        None => None,
    };
    let (net, net_events) = net::spawn(
        NetConfig {
            keypair: keypair.clone(),
            network: config.network.clone(),
            listen: config.listen.clone(),
            bootstrap: config.bootstrap.iter().map(|b| b.addr.clone()).collect(),
            known_peers,
            mdns: config.mdns,
            heartbeat,
            sync_bytes: kith_metrics.sync_bytes(),
            peer_faults: kith_metrics.peer_faults(),
            caps: net::limits::CapSettings::default(),
            file_bytes: kith_metrics.file_bytes(),
            nat: config.nat.clone(),
        },
        metrics_listener.as_ref().map(|_| &mut registry),
    )?;
    let files_dir = data_dir.join("files");
    let blobs = crate::files::BlobStore::open(&files_dir, config.files.quota_bytes)
        .map_err(StartError::Files)?;
    let (engine, engine_task) = engine::start(
        store,
        blobs,
        files_dir.join("tmp"),
        &keypair,
        engine::EngineSettings {
            network: config.network.clone(),
            retention: config.retention,
            update_policy: config.update_policy,
            past_epoch_ttl: config.past_epoch_ttl,
            chat: config.chat,
            files: config.files,
        },
        net.clone(),
        net_events,
        kith_metrics.clone(),
    )?;

    let api_token = identity::load_or_create_api_token(&data_dir)?;
    let listener = TcpListener::bind(config.api_listen)
        .await
        .map_err(|source| StartError::Api {
            addr: config.api_listen,
            source,
        })?;
    let api_addr = listener.local_addr().map_err(|source| StartError::Api {
        addr: config.api_listen,
        source,
    })?;
    identity::write_api_addr(&data_dir, api_addr)?;
    let (api_stop, stop_rx) = oneshot::channel::<()>();
    let sessions = Arc::new(crate::web::sessions::Sessions::open(&data_dir)?);
    let api_task = tokio::spawn(crate::api::serve(
        listener,
        engine.clone(),
        api_token.clone(),
        sessions,
        async move {
            let _ = stop_rx.await;
        },
    ));
    let (metrics_addr, metrics_server) = match metrics_listener {
        Some((requested, listener)) => {
            let addr = listener
                .local_addr()
                .map_err(|source| StartError::Metrics {
                    addr: requested,
                    source,
                })?;
            identity::write_metrics_addr(&data_dir, addr)?;
            let (stop, stop_rx) = oneshot::channel::<()>();
            let task = tokio::spawn(metrics::serve(listener, Arc::new(registry), async move {
                let _ = stop_rx.await;
            }));
            tracing::info!(%addr, "serving metrics on /metrics");
            (Some(addr), Some((stop, task)))
        }
        None => (None, None),
    };
    tracing::info!(%peer_id, network = %config.network, api = %api_addr, "node started");
    Ok(RunningNode {
        engine,
        net,
        api_addr,
        api_token,
        peer_id,
        metrics_addr,
        metrics: kith_metrics,
        data_dir,
        engine_task,
        api_stop,
        api_task,
        metrics_server,
    })
}

impl RunningNode {
    /// Stops the API, then the engine (which closes the store), then the network.
    pub async fn shutdown(self) {
        let _ = self.api_stop.send(());
        match tokio::time::timeout(Duration::from_secs(5), self.api_task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "API server stopped with an error"),
            Ok(Err(e)) => tracing::warn!(error = %e, "API task failed"),
            Err(_) => tracing::warn!("API server did not stop within 5 s"),
        }
        if let Some((stop, mut task)) = self.metrics_server {
            let _ = stop.send(());
            match tokio::time::timeout(Duration::from_secs(5), &mut task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    tracing::warn!(error = %e, "metrics server stopped with an error")
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "metrics task failed"),
                Err(_) => {
                    tracing::warn!("metrics server did not stop within 5 s; aborting it");
                    task.abort();
                }
            }
            if let Err(e) = identity::remove_metrics_addr(&self.data_dir) {
                tracing::debug!(error = %e, "cannot remove metrics.addr");
            }
        }
        let files = self.engine.files().clone();
        files.shutdown();
        let blobs = files.store_weak();
        drop(files);
        drop(self.engine);
        self.engine_task.shutdown().await;
        self.net.shutdown().await;
        // The file store closes when the last task that used it has ended (the forwarder
        // ends with the network task): wait for that, so the same data directory can be
        // opened again at once (a second open of files.redb is refused while one is open).
        // A disk read or a batch's fsync already under way finishes first; on a loaded
        // machine that took more than 5 s once (a full test run beside two builds).
        let deadline = tokio::time::Instant::now() + FILE_STORE_CLOSE_WAIT;
        while blobs.strong_count() > 0 {
            if tokio::time::Instant::now() > deadline {
                tracing::warn!(
                    "the file store is still in use {FILE_STORE_CLOSE_WAIT:?} after shutdown"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Err(e) = identity::remove_api_addr(&self.data_dir) {
            tracing::debug!(error = %e, "cannot remove api.addr");
        }
        tracing::info!("node stopped; store closed");
    }
}

/// Waits for Ctrl-C or (on Unix) SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// `kith run`: starts the node in the foreground and stops it cleanly on Ctrl-C or SIGTERM.
/// `recovery` is what the start check may set aside (see [`crate::datadir`]).
pub async fn run(
    data_dir: &Path,
    config: NodeConfig,
    recovery: Recovery,
) -> Result<(), StartError> {
    let node = start_with(
        NodeOptions {
            data_dir: data_dir.to_owned(),
            config,
            heartbeat: DEFAULT_HEARTBEAT,
        },
        recovery,
    )
    .await?;
    println!("kith node {} is running", node.peer_id);
    println!(
        "local API on http://{} (token in {})",
        node.api_addr,
        data_dir.join("api.token").display()
    );
    if let Some(addr) = node.metrics_addr {
        println!("metrics on http://{addr}/metrics");
    }
    shutdown_signal().await;
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
}
