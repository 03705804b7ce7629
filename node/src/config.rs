//! The node's configuration: `<data_dir>/config.toml`, then environment, then flags.
//!
//! [`Config`] is the raw, serde form of the file (every field has a default, unknown fields
//! are refused so a typo does not silently do nothing). [`Config::validate`] turns it into a
//! [`NodeConfig`] of typed values, or a [`ConfigError`] naming the field that is wrong.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

use kith_protocol::group::UpdatePolicy;

pub use crate::net::{NatSettings, RelayLimits};
use crate::store::{DEFAULT_RETENTION_DAYS, DEFAULT_RETENTION_MAX_MESSAGES, Retention};

/// File name of the configuration file inside the data directory.
pub const CONFIG_FILE: &str = "config.toml";
/// Environment variable naming the data directory (also read by the `--data-dir` flag).
pub const DATA_DIR_ENV: &str = "KITH_DATA_DIR";
/// The network id used when none is configured.
pub const DEFAULT_NETWORK: &str = "kith";
/// The default libp2p port, for both TCP and QUIC.
pub const DEFAULT_PORT: u16 = 7341;
/// Longest accepted network id (the wire format's bound).
pub const MAX_NETWORK_ID_BYTES: usize = kith_protocol::envelope::MAX_NETWORK_ID_BYTES;
/// Longest accepted config file; a bigger file is surely not a config file.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;
/// Longest accepted `retention.max_age_days` (100 years; also keeps the milliseconds far
/// from overflowing).
pub const MAX_RETENTION_DAYS: u64 = 36_500;
/// Largest accepted `retention.max_messages` per group.
pub const MAX_RETENTION_MESSAGES: u64 = 100_000_000;

/// Environment variables read by [`Config::apply_env`], one per field.
pub mod env {
    /// Overrides `network`.
    pub const NETWORK: &str = "KITH_NETWORK";
    /// Overrides `listen` (comma-separated multiaddrs).
    pub const LISTEN: &str = "KITH_LISTEN";
    /// Overrides `bootstrap` (comma-separated multiaddrs ending in `/p2p/<peer id>`).
    pub const BOOTSTRAP: &str = "KITH_BOOTSTRAP";
    /// Overrides `mdns` (`true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`).
    pub const MDNS: &str = "KITH_MDNS";
    /// Overrides `api_listen` (`IP:PORT`).
    pub const API_LISTEN: &str = "KITH_API_LISTEN";
    /// Overrides `api_allow_non_loopback` (boolean, as for `KITH_MDNS`).
    pub const API_ALLOW_NON_LOOPBACK: &str = "KITH_API_ALLOW_NON_LOOPBACK";
    /// Overrides `metrics_listen` (`IP:PORT`).
    pub const METRICS: &str = "KITH_METRICS";
    /// Overrides `nat.relay_service` (boolean, as for `KITH_MDNS`).
    pub const RELAY_SERVICE: &str = "KITH_RELAY_SERVICE";
    /// Overrides `nat.upnp` (boolean, as for `KITH_MDNS`).
    pub const UPNP: &str = "KITH_UPNP";
    /// Overrides `nat.public` (boolean, as for `KITH_MDNS`).
    pub const PUBLIC: &str = "KITH_PUBLIC";
}

/// Why the configuration could not be loaded. Each variant names the file, variable or
/// field at fault, so the user knows what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file exists but could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The config file is larger than any sensible config file.
    #[error("{path} is too large to be a config file ({size} bytes)")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// The config file is not valid TOML, has an unknown field or a value of the wrong type.
    #[error("{path} is invalid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML parser's explanation (names the line and the field).
        message: String,
    },
    /// A field has a value of the right type but not a usable one (e.g. a bad multiaddr).
    #[error("invalid `{field}` value '{value}': {reason}")]
    InvalidField {
        /// The config field, as spelled in `config.toml`.
        field: &'static str,
        /// The offending value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An environment variable has a value that cannot be used.
    #[error("invalid environment variable {var}='{value}': {reason}")]
    InvalidEnv {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The API would listen on a non-loopback address, which exposes it to the network.
    #[error(
        "refusing to serve the local API on non-loopback address {0}; \
         set `api_allow_non_loopback = true` if you really want that"
    )]
    NonLoopbackApi(SocketAddr),
    /// The metrics endpoint (which has no authentication) would listen on a non-loopback
    /// address.
    #[error(
        "refusing to serve metrics on non-loopback address {0}; \
         set `api_allow_non_loopback = true` if you really want that"
    )]
    NonLoopbackMetrics(SocketAddr),
    /// No data directory was given and the platform has none (no home directory).
    #[error("cannot determine a data directory; pass --data-dir or set {DATA_DIR_ENV}")]
    NoDataDir,
}

/// The configuration file's contents. Every field has a default, so an empty file (or no
/// file at all) is a valid configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Network id: group topics, DHT rendezvous keys and invite links are scoped to it, so
    /// groups and invites of one network are invisible to another (the DHT itself is shared).
    pub network: String,
    /// libp2p listen multiaddrs.
    pub listen: Vec<String>,
    /// Peers to contact at start, multiaddrs ending in `/p2p/<peer id>`.
    pub bootstrap: Vec<String>,
    /// Whether to find peers on the local network with mDNS.
    pub mdns: bool,
    /// Where the local HTTP API listens (port 0 picks a free port).
    pub api_listen: SocketAddr,
    /// Allow `api_listen` and `metrics_listen` to be non-loopback addresses (off: both are
    /// local only).
    pub api_allow_non_loopback: bool,
    /// Where to serve Prometheus/OpenMetrics metrics on `GET /metrics` (port 0 picks a
    /// free port); off when absent.
    pub metrics_listen: Option<SocketAddr>,
    /// How much history to keep per group (`[retention]`).
    pub retention: RetentionConfig,
    /// When this node refreshes its own key in each group (`[keys]`).
    pub keys: KeysConfig,
    /// NAT traversal: the relay service for others, relays for us, UPnP (`[nat]`).
    pub nat: NatConfig,
    /// Read receipts, typing notices, direct chats (`[chat]`).
    pub chat: ChatConfig,
    /// Files: sizes, automatic download, the file store's quota (`[files]`).
    pub files: FilesConfig,
}

/// Largest `files.max_file_mib` (4 GiB, the protocol's limit).
pub const MAX_FILE_MIB: u64 = kith_protocol::files::MAX_FILE_BYTES >> 20;

/// `[files]` in `config.toml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FilesConfig {
    /// Largest file this node sends, MiB (1 to [`MAX_FILE_MIB`]; default 100).
    pub max_file_mib: u64,
    /// Files up to this size are fetched as soon as their message arrives, KiB (0: never;
    /// default 10240, 10 MiB). Per group: `kith group files GROUP --auto KIB`.
    pub auto_download_kib: u64,
    /// Space the file store may use, MiB (default 2048); the oldest unpinned files are
    /// removed to make room.
    pub quota_mib: u64,
    /// Most bytes per second this node fetches, KiB/s (0: no limit, the default).
    pub download_kib_per_sec: u64,
}

impl Default for FilesConfig {
    fn default() -> Self {
        FilesConfig {
            max_file_mib: 100,
            auto_download_kib: 10 * 1024,
            quota_mib: 2048,
            download_kib_per_sec: 0,
        }
    }
}

impl FilesConfig {
    fn validate(&self) -> Result<crate::files::FilePolicy, ConfigError> {
        let bad = |field, value: u64, reason: String| ConfigError::InvalidField {
            field,
            value: value.to_string(),
            reason,
        };
        if !(1..=MAX_FILE_MIB).contains(&self.max_file_mib) {
            return Err(bad(
                "files.max_file_mib",
                self.max_file_mib,
                format!("must be 1 to {MAX_FILE_MIB} MiB"),
            ));
        }
        if self.quota_mib < 1 || self.quota_mib > 1 << 24 {
            return Err(bad(
                "files.quota_mib",
                self.quota_mib,
                "must be 1 to 16777216 MiB".into(),
            ));
        }
        if self.auto_download_kib > MAX_FILE_MIB << 10 {
            return Err(bad(
                "files.auto_download_kib",
                self.auto_download_kib,
                format!("must be at most {} KiB", MAX_FILE_MIB << 10),
            ));
        }
        if self.download_kib_per_sec > 1 << 30 {
            return Err(bad(
                "files.download_kib_per_sec",
                self.download_kib_per_sec,
                "must be at most 1073741824 KiB/s (0: no limit)".into(),
            ));
        }
        Ok(crate::files::FilePolicy {
            max_file_bytes: self.max_file_mib << 20,
            auto_download_bytes: self.auto_download_kib << 10,
            quota_bytes: self.quota_mib << 20,
            download_bytes_per_sec: self.download_kib_per_sec << 10,
            corrupt_served: false,
        })
    }
}

/// `[chat]` in `config.toml`: which chat notices this node sends and shows. Both notices
/// are MLS messages to the group like any other (members only); off means this node
/// neither sends them nor shows others'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatConfig {
    /// Send read receipts and show others' (default true).
    pub read_receipts: bool,
    /// Send "typing" notices and show others' (default false).
    pub typing: bool,
    /// Join by itself a direct chat that a member of a shared group starts with this node
    /// (default true).
    pub accept_direct: bool,
}

impl Default for ChatConfig {
    fn default() -> Self {
        let d = crate::engine::ChatPolicy::default();
        ChatConfig {
            read_receipts: d.read_receipts,
            typing: d.typing,
            accept_direct: d.accept_direct,
        }
    }
}

/// `[nat]` in `config.toml`: how the node gets through home routers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatConfig {
    /// Relay circuits for nodes behind NAT while this node is directly reachable.
    pub relay_service: bool,
    /// Reservations held on other nodes' relays while this node is not directly reachable
    /// (0 to [`MAX_RELAYS_WANTED`]; 0: never reachable from outside the LAN).
    pub relays_wanted: u64,
    /// Ask the home router for a port mapping with UPnP.
    pub upnp: bool,
    /// This machine's own public addresses are reachable (a server, or a forwarded port):
    /// announce them at once rather than waiting for AutoNAT.
    pub public: bool,
    /// Relay service: nodes holding a reservation at once.
    pub relay_max_reservations: u64,
    /// Relay service: circuits at once.
    pub relay_max_circuits: u64,
    /// Relay service: circuits at once per peer.
    pub relay_max_circuits_per_peer: u64,
    /// Relay service: minutes a circuit lasts before it is closed.
    pub relay_circuit_minutes: u64,
    /// Relay service: KiB a circuit carries each way before it is closed.
    pub relay_circuit_kib: u64,
}

/// Largest accepted `nat.relays_wanted`.
pub const MAX_RELAYS_WANTED: u64 = 8;

impl Default for NatConfig {
    fn default() -> Self {
        let d = crate::net::NatSettings::default();
        let l = crate::net::RelayLimits::default();
        NatConfig {
            relay_service: d.relay_service.is_some(),
            relays_wanted: d.relays_wanted as u64,
            upnp: d.upnp,
            public: d.public,
            relay_max_reservations: l.max_reservations as u64,
            relay_max_circuits: l.max_circuits as u64,
            relay_max_circuits_per_peer: l.max_circuits_per_peer as u64,
            relay_circuit_minutes: l.circuit_duration.as_secs() / 60,
            relay_circuit_kib: l.circuit_bytes / 1024,
        }
    }
}

impl NatConfig {
    /// Checks the bounds and converts to the network's settings.
    pub fn validate(&self) -> Result<crate::net::NatSettings, ConfigError> {
        let bounded = |field: &'static str, v: u64, max: u64, unit: &str| {
            if (1..=max).contains(&v) {
                Ok(v)
            } else {
                Err(ConfigError::InvalidField {
                    field,
                    value: v.to_string(),
                    reason: format!("must be 1 to {max} {unit}"),
                })
            }
        };
        if self.relays_wanted > MAX_RELAYS_WANTED {
            return Err(ConfigError::InvalidField {
                field: "nat.relays_wanted",
                value: self.relays_wanted.to_string(),
                reason: format!("must be 0 to {MAX_RELAYS_WANTED}"),
            });
        }
        let limits = crate::net::RelayLimits {
            max_reservations: bounded(
                "nat.relay_max_reservations",
                self.relay_max_reservations,
                4096,
                "reservations",
            )? as usize,
            max_circuits: bounded(
                "nat.relay_max_circuits",
                self.relay_max_circuits,
                1024,
                "circuits",
            )? as usize,
            max_circuits_per_peer: bounded(
                "nat.relay_max_circuits_per_peer",
                self.relay_max_circuits_per_peer,
                64,
                "circuits",
            )? as usize,
            circuit_duration: std::time::Duration::from_secs(
                60 * bounded(
                    "nat.relay_circuit_minutes",
                    self.relay_circuit_minutes,
                    1440,
                    "minutes",
                )?,
            ),
            circuit_bytes: 1024
                * bounded(
                    "nat.relay_circuit_kib",
                    self.relay_circuit_kib,
                    1 << 20,
                    "KiB",
                )?,
        };
        Ok(crate::net::NatSettings {
            relay_service: self.relay_service.then_some(limits),
            relays_wanted: self.relays_wanted as usize,
            upnp: self.upnp,
            public: self.public,
        })
    }
}

/// Largest accepted `keys.update_after_messages`.
pub const MAX_UPDATE_AFTER_MESSAGES: u64 = 1_000_000;
/// Largest accepted `keys.update_after_days`.
pub const MAX_UPDATE_AFTER_DAYS: u64 = 365;

/// `[keys]` in `config.toml`: when this node commits a fresh leaf key of its own in a group
/// (an MLS self-update, for post-compromise security), whichever comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeysConfig {
    /// After this many own messages in the group (1 to [`MAX_UPDATE_AFTER_MESSAGES`]).
    pub update_after_messages: u64,
    /// After this many days since this node's last commit in the group (1 to
    /// [`MAX_UPDATE_AFTER_DAYS`]).
    pub update_after_days: u64,
}

impl Default for KeysConfig {
    fn default() -> Self {
        let d = UpdatePolicy::default();
        KeysConfig {
            update_after_messages: d.after_messages,
            update_after_days: d.after_ms / 86_400_000,
        }
    }
}

impl KeysConfig {
    /// Checks the bounds and converts to the engine's [`UpdatePolicy`].
    pub fn validate(&self) -> Result<UpdatePolicy, ConfigError> {
        if !(1..=MAX_UPDATE_AFTER_MESSAGES).contains(&self.update_after_messages) {
            return Err(ConfigError::InvalidField {
                field: "keys.update_after_messages",
                value: self.update_after_messages.to_string(),
                reason: format!("must be 1 to {MAX_UPDATE_AFTER_MESSAGES} messages"),
            });
        }
        if !(1..=MAX_UPDATE_AFTER_DAYS).contains(&self.update_after_days) {
            return Err(ConfigError::InvalidField {
                field: "keys.update_after_days",
                value: self.update_after_days.to_string(),
                reason: format!("must be 1 to {MAX_UPDATE_AFTER_DAYS} days"),
            });
        }
        Ok(UpdatePolicy {
            after_messages: self.update_after_messages,
            after_ms: self.update_after_days * 86_400_000,
        })
    }
}

/// `[retention]` in `config.toml`: how much history the node keeps per group. The prune
/// runs at start and every 10 minutes (see [`crate::store::Store::prune`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// History entries sent more than this many days ago are deleted (1 to
    /// [`MAX_RETENTION_DAYS`]).
    pub max_age_days: u64,
    /// At most this many history entries are kept per group, the newest in history order
    /// (1 to [`MAX_RETENTION_MESSAGES`]).
    pub max_messages: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            max_age_days: DEFAULT_RETENTION_DAYS,
            max_messages: DEFAULT_RETENTION_MAX_MESSAGES,
        }
    }
}

impl RetentionConfig {
    /// Checks the bounds and converts to the store's [`Retention`].
    pub fn validate(&self) -> Result<Retention, ConfigError> {
        if !(1..=MAX_RETENTION_DAYS).contains(&self.max_age_days) {
            return Err(ConfigError::InvalidField {
                field: "retention.max_age_days",
                value: self.max_age_days.to_string(),
                reason: format!("must be 1 to {MAX_RETENTION_DAYS} days"),
            });
        }
        if !(1..=MAX_RETENTION_MESSAGES).contains(&self.max_messages) {
            return Err(ConfigError::InvalidField {
                field: "retention.max_messages",
                value: self.max_messages.to_string(),
                reason: format!("must be 1 to {MAX_RETENTION_MESSAGES} entries per group"),
            });
        }
        Ok(Retention {
            max_age_ms: self.max_age_days * 24 * 3600 * 1000,
            max_messages: self.max_messages,
        })
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            network: DEFAULT_NETWORK.to_owned(),
            chat: ChatConfig::default(),
            files: FilesConfig::default(),
            listen: vec![
                format!("/ip4/0.0.0.0/tcp/{DEFAULT_PORT}"),
                format!("/ip4/0.0.0.0/udp/{DEFAULT_PORT}/quic-v1"),
            ],
            bootstrap: Vec::new(),
            mdns: true,
            api_listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            api_allow_non_loopback: false,
            metrics_listen: None,
            retention: RetentionConfig::default(),
            keys: KeysConfig::default(),
            nat: NatConfig::default(),
        }
    }
}

/// Values given on the command line; each one set replaces the file's and env's value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigOverrides {
    /// `--network`.
    pub network: Option<String>,
    /// `--listen` (replaces the list if not empty).
    pub listen: Vec<String>,
    /// `--bootstrap` (replaces the list if not empty).
    pub bootstrap: Vec<String>,
    /// `--no-mdns`.
    pub no_mdns: bool,
    /// `--api-listen`.
    pub api_listen: Option<SocketAddr>,
    /// `--metrics`.
    pub metrics_listen: Option<SocketAddr>,
    /// `--no-relay-service`.
    pub no_relay_service: bool,
    /// `--upnp`.
    pub upnp: bool,
    /// `--public`.
    pub public: bool,
}

/// A bootstrap peer: its id and where to dial it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapPeer {
    /// The peer's id (the address's `/p2p/` component).
    pub peer_id: PeerId,
    /// The full address, including the `/p2p/` component.
    pub addr: Multiaddr,
}

/// A validated configuration, in typed values, ready for the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Network id (1 to 64 characters of `A-Z a-z 0-9 . _ -`).
    pub network: String,
    /// libp2p listen addresses.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start.
    pub bootstrap: Vec<BootstrapPeer>,
    /// Whether mDNS discovery is on.
    pub mdns: bool,
    /// Where the local API listens; loopback unless explicitly allowed otherwise.
    pub api_listen: SocketAddr,
    /// Where the metrics endpoint listens, if on; loopback unless explicitly allowed
    /// otherwise.
    pub metrics_listen: Option<SocketAddr>,
    /// How much history to keep per group.
    pub retention: Retention,
    /// When to refresh this node's own key in each group.
    pub update_policy: UpdatePolicy,
    /// NAT traversal settings.
    pub nat: crate::net::NatSettings,
    /// Chat notices.
    pub chat: crate::engine::ChatPolicy,
    /// Files: sizes, automatic download, quota.
    pub files: crate::files::FilePolicy,
    /// How long past epochs' secrets are kept after this node left them: always
    /// [`kith_protocol::group::PAST_EPOCH_TTL`] from a config file; tests shorten it.
    pub past_epoch_ttl: std::time::Duration,
}

impl Config {
    /// Reads `<data_dir>/config.toml`; a missing file gives the defaults.
    pub fn load(data_dir: &Path) -> Result<Config, ConfigError> {
        let path = data_dir.join(CONFIG_FILE);
        let text = match read_bounded(&path) {
            Ok(text) => text,
            Err(ConfigError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(Config::default());
            }
            Err(e) => return Err(e),
        };
        Config::from_toml(&text).map_err(|message| ConfigError::Parse { path, message })
    }

    /// Parses config text; the error is the TOML parser's message.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().replace('\n', " "))
    }

    /// Applies the `KITH_*` variables of [`env`] from the process environment.
    pub fn apply_process_env(&mut self) -> Result<(), ConfigError> {
        self.apply_env(|var| std::env::var_os(var))
    }

    /// Applies the `KITH_*` variables of [`env`] read through `lookup` (unset or empty
    /// variables are ignored).
    pub fn apply_env(
        &mut self,
        lookup: impl Fn(&str) -> Option<OsString>,
    ) -> Result<(), ConfigError> {
        let get = |var: &'static str| -> Result<Option<String>, ConfigError> {
            match lookup(var) {
                None => Ok(None),
                Some(v) if v.is_empty() => Ok(None),
                Some(v) => v
                    .into_string()
                    .map(Some)
                    .map_err(|v| ConfigError::InvalidEnv {
                        var,
                        value: v.to_string_lossy().into_owned(),
                        reason: "not valid UTF-8".to_owned(),
                    }),
            }
        };
        if let Some(v) = get(env::NETWORK)? {
            self.network = v;
        }
        if let Some(v) = get(env::LISTEN)? {
            self.listen = split_list(&v);
        }
        if let Some(v) = get(env::BOOTSTRAP)? {
            self.bootstrap = split_list(&v);
        }
        if let Some(v) = get(env::MDNS)? {
            self.mdns = parse_env_bool(env::MDNS, &v)?;
        }
        if let Some(v) = get(env::API_LISTEN)? {
            self.api_listen = v.trim().parse().map_err(|e| ConfigError::InvalidEnv {
                var: env::API_LISTEN,
                value: v.clone(),
                reason: format!("{e} (expected IP:PORT, e.g. 127.0.0.1:7342)"),
            })?;
        }
        if let Some(v) = get(env::API_ALLOW_NON_LOOPBACK)? {
            self.api_allow_non_loopback = parse_env_bool(env::API_ALLOW_NON_LOOPBACK, &v)?;
        }
        if let Some(v) = get(env::RELAY_SERVICE)? {
            self.nat.relay_service = parse_env_bool(env::RELAY_SERVICE, &v)?;
        }
        if let Some(v) = get(env::UPNP)? {
            self.nat.upnp = parse_env_bool(env::UPNP, &v)?;
        }
        if let Some(v) = get(env::PUBLIC)? {
            self.nat.public = parse_env_bool(env::PUBLIC, &v)?;
        }
        if let Some(v) = get(env::METRICS)? {
            self.metrics_listen = Some(v.trim().parse().map_err(|e| ConfigError::InvalidEnv {
                var: env::METRICS,
                value: v.clone(),
                reason: format!("{e} (expected IP:PORT, e.g. 127.0.0.1:9464)"),
            })?);
        }
        Ok(())
    }

    /// Applies command-line values, which win over the file and the environment.
    pub fn apply_overrides(&mut self, overrides: &ConfigOverrides) {
        if let Some(network) = &overrides.network {
            self.network = network.clone();
        }
        if !overrides.listen.is_empty() {
            self.listen = overrides.listen.clone();
        }
        if !overrides.bootstrap.is_empty() {
            self.bootstrap = overrides.bootstrap.clone();
        }
        if overrides.no_mdns {
            self.mdns = false;
        }
        if let Some(api_listen) = overrides.api_listen {
            self.api_listen = api_listen;
        }
        if let Some(metrics_listen) = overrides.metrics_listen {
            self.metrics_listen = Some(metrics_listen);
        }
        if overrides.no_relay_service {
            self.nat.relay_service = false;
        }
        if overrides.upnp {
            self.nat.upnp = true;
        }
        if overrides.public {
            self.nat.public = true;
        }
    }

    /// Checks every field and converts it to its typed form.
    pub fn validate(&self) -> Result<NodeConfig, ConfigError> {
        validate_network(&self.network)?;
        let listen = self
            .listen
            .iter()
            .map(|a| parse_listen_addr(a))
            .collect::<Result<Vec<_>, _>>()?;
        if listen.is_empty() {
            return Err(ConfigError::InvalidField {
                field: "listen",
                value: String::new(),
                reason: "at least one listen address is needed".to_owned(),
            });
        }
        let bootstrap = self
            .bootstrap
            .iter()
            .map(|a| parse_bootstrap_addr(a))
            .collect::<Result<Vec<_>, _>>()?;
        if !self.api_listen.ip().is_loopback() && !self.api_allow_non_loopback {
            return Err(ConfigError::NonLoopbackApi(self.api_listen));
        }
        if let Some(addr) = self.metrics_listen
            && !addr.ip().is_loopback()
            && !self.api_allow_non_loopback
        {
            return Err(ConfigError::NonLoopbackMetrics(addr));
        }
        let retention = self.retention.validate()?;
        let update_policy = self.keys.validate()?;
        let nat = self.nat.validate()?;
        let files = self.files.validate()?;
        Ok(NodeConfig {
            files,
            network: self.network.clone(),
            listen,
            bootstrap,
            mdns: self.mdns,
            api_listen: self.api_listen,
            metrics_listen: self.metrics_listen,
            retention,
            update_policy,
            nat,
            chat: crate::engine::ChatPolicy {
                read_receipts: self.chat.read_receipts,
                typing: self.chat.typing,
                accept_direct: self.chat.accept_direct,
            },
            past_epoch_ttl: kith_protocol::group::PAST_EPOCH_TTL,
        })
    }

    /// The whole chain for `kith run`: file, process environment, flags, validation.
    pub fn resolve(
        data_dir: &Path,
        overrides: &ConfigOverrides,
    ) -> Result<NodeConfig, ConfigError> {
        let mut config = Config::load(data_dir)?;
        config.apply_process_env()?;
        config.apply_overrides(overrides);
        config.validate()
    }

    /// The commented config file that `kith init` writes, with the default values.
    pub fn default_toml() -> String {
        Config::template_toml(DEFAULT_NETWORK)
    }

    /// The commented config file with the given network id and defaults otherwise.
    pub fn template_toml(network: &str) -> String {
        let d = Config::default();
        let quote = |s: &str| toml::Value::String(s.to_owned()).to_string();
        let list = |v: &[String]| {
            if v.is_empty() {
                "[]".to_owned()
            } else {
                let items: Vec<String> = v.iter().map(|s| format!("    {},\n", quote(s))).collect();
                format!("[\n{}]", items.concat())
            }
        };
        format!(
            r#"# Kith node configuration.
#
# Every setting has a default; delete a line to use it. Each setting can also be set
# with an environment variable (shown below) or a `kith run` flag; flags win over the
# environment, which wins over this file.

# Network id. Group topics, DHT rendezvous keys and invite links are scoped to it, so a
# group or invite of one network is invisible to another (nodes still share the DHT).
# 1 to 64 characters of A-Z a-z 0-9 . _ -
# Env: KITH_NETWORK. Flag: --network.
network = {network}

# libp2p addresses to listen on (multiaddrs): TCP and QUIC on port {port} by default.
# Env: KITH_LISTEN (comma-separated). Flag: --listen (repeatable).
listen = {listen}

# Peers to contact at start, as multiaddrs ending in /p2p/<peer id>, for example
# "/ip4/203.0.113.7/tcp/7341/p2p/12D3KooW...". Invite links carry addresses too.
# Env: KITH_BOOTSTRAP (comma-separated). Flag: --bootstrap (repeatable).
bootstrap = {bootstrap}

# Find other nodes on the local network with mDNS.
# Env: KITH_MDNS (true/false). Flag: --no-mdns.
mdns = {mdns}

# Address of the local HTTP API used by the `kith` commands (port 0 picks a free port;
# the chosen address is written to api.addr in the data directory).
# Env: KITH_API_LISTEN. Flag: --api-listen.
api_listen = {api_listen}

# The API and the metrics endpoint are refused on any non-loopback address unless this
# is true. Anyone who can reach the API and read api.token controls the node; anyone who
# can reach the metrics endpoint can read it.
# Env: KITH_API_ALLOW_NON_LOOPBACK (true/false).
api_allow_non_loopback = {allow}

# Serve Prometheus/OpenMetrics metrics on http://IP:PORT/metrics (off unless set; port 0
# picks a free port; the chosen address is written to metrics.addr in the data directory).
# Env: KITH_METRICS. Flag: --metrics.
# metrics_listen = "127.0.0.1:9464"

# How much history to keep per group. Entries sent more than `max_age_days` ago, and
# entries beyond the newest `max_messages` (in history order), are deleted at start and
# every 10 minutes, with the stored envelopes history sync would serve for them; members
# that come back later cannot fetch deleted history from this node.
# max_age_days: 1 to {max_days}. max_messages: 1 to {max_messages} entries per group.
# File only (no environment variable or flag).
[retention]
max_age_days = {age}
max_messages = {keep}

# When this node commits a fresh key of its own in each group (an MLS self-update): after
# `update_after_messages` of its own messages there, or `update_after_days` days after its
# last commit there, whichever comes first. Fresh keys limit what a stolen key can read
# (post-compromise security); each update is one small commit to the group.
# update_after_messages: 1 to {max_update_messages}. update_after_days: 1 to {max_update_days}.
# File only (no environment variable or flag).
[keys]
update_after_messages = {update_messages}
update_after_days = {update_days}

# Getting through home routers (NAT). A node that others can dial (AutoNAT checks this)
# relays circuits for nodes behind NAT within the limits below; a node behind NAT holds
# `relays_wanted` reservations on such relays (members of its groups first), and direct
# connections are punched through the NATs where they allow it.
# relay_service: Env KITH_RELAY_SERVICE (true/false). Flag: --no-relay-service.
# upnp (ask the router for a port mapping): Env KITH_UPNP (true/false). Flag: --upnp.
# public (this machine's public addresses are reachable, e.g. a server: announce them at
# once; AutoNAT only checks over connections this node dialled, so a node that is only
# ever dialled needs this to be known as reachable): Env KITH_PUBLIC. Flag: --public.
# relays_wanted: 0 to {max_relays}. The relay_* limits: file only.
[nat]
relay_service = {relay_service}
relays_wanted = {relays_wanted}
upnp = {upnp}
public = {public}
relay_max_reservations = {relay_res}
relay_max_circuits = {relay_circ}
relay_max_circuits_per_peer = {relay_circ_peer}
relay_circuit_minutes = {relay_minutes}
relay_circuit_kib = {relay_kib}

# Chat notices, sent inside each group's encryption to its members only. Off: this node
# neither sends them nor shows others'. accept_direct: join a direct chat that a member of
# a shared group starts with you (`kith dm`) by itself. File only.
[chat]
read_receipts = {receipts}
typing = {typing}
accept_direct = {accept_direct}

# Files and pictures (`kith send GROUP --file PATH`). max_file_mib: the largest file this
# node sends (1 to {max_file}). Files up to auto_download_kib are fetched as soon as their
# message arrives (0: only with `kith download`; per group: `kith group files`). The file
# store keeps what this node sent and fetched, and serves it to the group's members, within
# quota_mib: the oldest unpinned files are removed to make room. download_kib_per_sec
# limits fetching (0: no limit). File only.
[files]
max_file_mib = {file_mib}
auto_download_kib = {auto_kib}
quota_mib = {quota}
download_kib_per_sec = {rate}
"#,
            max_file = MAX_FILE_MIB,
            file_mib = d.files.max_file_mib,
            auto_kib = d.files.auto_download_kib,
            quota = d.files.quota_mib,
            rate = d.files.download_kib_per_sec,
            network = quote(network),
            port = DEFAULT_PORT,
            listen = list(&d.listen),
            bootstrap = list(&d.bootstrap),
            mdns = d.mdns,
            api_listen = quote(&d.api_listen.to_string()),
            allow = d.api_allow_non_loopback,
            max_days = MAX_RETENTION_DAYS,
            max_messages = MAX_RETENTION_MESSAGES,
            age = d.retention.max_age_days,
            keep = d.retention.max_messages,
            max_update_messages = MAX_UPDATE_AFTER_MESSAGES,
            max_update_days = MAX_UPDATE_AFTER_DAYS,
            update_messages = d.keys.update_after_messages,
            update_days = d.keys.update_after_days,
            max_relays = MAX_RELAYS_WANTED,
            relay_service = d.nat.relay_service,
            relays_wanted = d.nat.relays_wanted,
            upnp = d.nat.upnp,
            public = d.nat.public,
            relay_res = d.nat.relay_max_reservations,
            relay_circ = d.nat.relay_max_circuits,
            relay_circ_peer = d.nat.relay_max_circuits_per_peer,
            relay_minutes = d.nat.relay_circuit_minutes,
            relay_kib = d.nat.relay_circuit_kib,
            receipts = d.chat.read_receipts,
            typing = d.chat.typing,
            accept_direct = d.chat.accept_direct,
        )
    }
}

/// Checks a network id: 1 to 64 characters of `A-Z a-z 0-9 . _ -`.
pub fn validate_network(network: &str) -> Result<(), ConfigError> {
    let bad = |reason: String| ConfigError::InvalidField {
        field: "network",
        value: network.to_owned(),
        reason,
    };
    if network.is_empty() || network.len() > MAX_NETWORK_ID_BYTES {
        return Err(bad(format!(
            "must be 1 to {MAX_NETWORK_ID_BYTES} characters"
        )));
    }
    if !network
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(bad("only A-Z a-z 0-9 . _ - are allowed".to_owned()));
    }
    Ok(())
}

/// Parses a listen address: a multiaddr without a `/p2p/` component.
fn parse_listen_addr(text: &str) -> Result<Multiaddr, ConfigError> {
    let bad = |reason: String| ConfigError::InvalidField {
        field: "listen",
        value: text.to_owned(),
        reason,
    };
    let addr: Multiaddr = text
        .trim()
        .parse()
        .map_err(|e| bad(format!("not a multiaddr: {e}")))?;
    if addr.iter().any(|p| matches!(p, Protocol::P2p(_))) {
        return Err(bad("a listen address must not contain /p2p/".to_owned()));
    }
    if addr.is_empty() {
        return Err(bad("empty address".to_owned()));
    }
    Ok(addr)
}

/// Parses a bootstrap address: a multiaddr ending in `/p2p/<peer id>`.
fn parse_bootstrap_addr(text: &str) -> Result<BootstrapPeer, ConfigError> {
    let bad = |reason: String| ConfigError::InvalidField {
        field: "bootstrap",
        value: text.to_owned(),
        reason,
    };
    let addr: Multiaddr = text
        .trim()
        .parse()
        .map_err(|e| bad(format!("not a multiaddr: {e}")))?;
    let components = addr.iter().count();
    match addr.iter().last() {
        Some(Protocol::P2p(peer_id)) if components > 1 => Ok(BootstrapPeer { peer_id, addr }),
        Some(Protocol::P2p(_)) => Err(bad("needs a transport address before /p2p/".to_owned())),
        _ => Err(bad("must end with /p2p/<peer id>".to_owned())),
    }
}

/// Splits a comma-separated list, dropping blanks.
fn split_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Parses a boolean environment value.
fn parse_env_bool(var: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::InvalidEnv {
            var,
            value: value.to_owned(),
            reason: "expected true or false".to_owned(),
        }),
    }
}

/// Reads a file of at most [`MAX_CONFIG_BYTES`].
fn read_bounded(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read;
    let read_err = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    if size > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge {
            path: path.to_owned(),
            size,
        });
    }
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    Ok(text)
}

/// Where the node keeps its key, config, database and API files: the `--data-dir` flag,
/// else `$KITH_DATA_DIR`, else the platform's data directory (e.g. `~/.local/share/kith`).
pub fn resolve_data_dir(flag: Option<&Path>) -> Result<PathBuf, ConfigError> {
    if let Some(dir) = flag.filter(|d| !d.as_os_str().is_empty()) {
        return Ok(dir.to_owned());
    }
    if let Some(dir) = std::env::var_os(DATA_DIR_ENV).filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    directories::ProjectDirs::from("org", "kith", "kith")
        .map(|dirs| dirs.data_dir().to_owned())
        .ok_or(ConfigError::NoDataDir)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        let node = Config::default().validate().unwrap();
        assert_eq!(node.network, "kith");
        assert_eq!(node.listen.len(), 2);
        assert!(node.bootstrap.is_empty());
        assert!(node.mdns);
        assert!(node.api_listen.ip().is_loopback());
        assert_eq!(node.api_listen.port(), 0);
    }

    #[test]
    fn empty_file_is_defaults() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn default_toml_parses_back_to_defaults() {
        assert_eq!(
            Config::from_toml(&Config::default_toml()).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn template_toml_sets_network() {
        let c = Config::from_toml(&Config::template_toml("test-net")).unwrap();
        assert_eq!(c.network, "test-net");
        assert_eq!(c.listen, Config::default().listen);
    }

    #[test]
    fn retention_defaults_are_the_store_defaults() {
        let node = Config::default().validate().unwrap();
        assert_eq!(node.retention, Retention::default());
        let text = Config::default_toml();
        assert!(text.contains("[retention]\nmax_age_days = 365\nmax_messages = 100000\n"));
    }

    #[test]
    fn key_update_policy_is_read_and_validated() {
        let node = Config::default().validate().unwrap();
        assert_eq!(node.update_policy, UpdatePolicy::default());
        let text = Config::default_toml();
        assert!(text.contains("[keys]\nupdate_after_messages = 1000\nupdate_after_days = 7\n"));
        let c = Config::from_toml("[keys]\nupdate_after_messages = 50\n").unwrap();
        let p = c.validate().unwrap().update_policy;
        assert_eq!((p.after_messages, p.after_ms), (50, 7 * 86_400_000));
        for (toml, field) in [
            (
                "[keys]\nupdate_after_messages = 0\n",
                "keys.update_after_messages",
            ),
            (
                "[keys]\nupdate_after_days = 366\n",
                "keys.update_after_days",
            ),
        ] {
            let err = Config::from_toml(toml).unwrap().validate().unwrap_err();
            assert!(err.to_string().contains(field), "{err}");
        }
        assert!(Config::from_toml("[keys]\nupdate_every = 5\n").is_err());
    }

    #[test]
    fn retention_is_read_and_validated() {
        let c = Config::from_toml("[retention]\nmax_messages = 50\n").unwrap();
        let node = c.validate().unwrap();
        assert_eq!(node.retention.max_messages, 50);
        assert_eq!(node.retention.max_age_ms, 365 * 24 * 3600 * 1000);
        let c = Config::from_toml("[retention]\nmax_age_days = 2\n").unwrap();
        assert_eq!(c.validate().unwrap().retention.max_age_ms, 2 * 86_400_000);
        for (text, field) in [
            ("[retention]\nmax_messages = 0\n", "retention.max_messages"),
            ("[retention]\nmax_age_days = 0\n", "retention.max_age_days"),
            (
                "[retention]\nmax_age_days = 36501\n",
                "retention.max_age_days",
            ),
        ] {
            let err = Config::from_toml(text).unwrap().validate().unwrap_err();
            let line = err.to_string();
            assert!(line.contains(field) && !line.contains('\n'), "{line}");
        }
        for text in [
            "[retention]\nmax_messages = -1\n",
            "[retention]\nmax_mesages = 5\n",
            "[retention]\nmax_age_days = \"a year\"\n",
        ] {
            let err = Config::from_toml(text).unwrap_err();
            assert!(err.contains("retention") || err.contains("max_"), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn unknown_field_is_refused() {
        let err = Config::from_toml("netwrok = \"x\"").unwrap_err();
        assert!(err.contains("netwrok"), "{err}");
    }

    #[test]
    fn bad_listen_multiaddr_names_the_field() {
        let c = Config {
            listen: vec!["/ip4/1.2.3/tcp/1".to_owned()],
            ..Config::default()
        };
        match c.validate() {
            Err(ConfigError::InvalidField { field, value, .. }) => {
                assert_eq!(field, "listen");
                assert_eq!(value, "/ip4/1.2.3/tcp/1");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn bootstrap_needs_p2p() {
        let c = Config {
            bootstrap: vec!["/ip4/1.2.3.4/tcp/7341".to_owned()],
            ..Config::default()
        };
        let err = c.validate().unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::InvalidField {
                    field: "bootstrap",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("bootstrap"));

        let peer = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let ok = Config {
            bootstrap: vec![format!("/ip4/1.2.3.4/tcp/7341/p2p/{peer}")],
            ..Config::default()
        };
        let node = ok.validate().unwrap();
        assert_eq!(node.bootstrap[0].peer_id, peer);

        let bare = Config {
            bootstrap: vec![format!("/p2p/{peer}")],
            ..Config::default()
        };
        assert!(bare.validate().is_err());
    }

    #[test]
    fn bad_network_is_refused() {
        for bad in ["", "has space", &"x".repeat(65)] {
            let c = Config {
                network: bad.to_owned(),
                ..Config::default()
            };
            assert!(
                matches!(
                    c.validate(),
                    Err(ConfigError::InvalidField {
                        field: "network",
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn non_loopback_api_needs_opt_in() {
        let mut c = Config {
            api_listen: "0.0.0.0:7342".parse().unwrap(),
            ..Config::default()
        };
        assert!(matches!(c.validate(), Err(ConfigError::NonLoopbackApi(_))));
        c.api_allow_non_loopback = true;
        assert!(c.validate().is_ok());
        let v6 = Config {
            api_listen: "[::1]:0".parse().unwrap(),
            ..Config::default()
        };
        assert!(v6.validate().is_ok());
    }

    #[test]
    fn metrics_are_off_by_default_and_loopback_only() {
        assert_eq!(Config::default().validate().unwrap().metrics_listen, None);
        let c = Config::from_toml("metrics_listen = \"127.0.0.1:0\"").unwrap();
        assert_eq!(
            c.validate().unwrap().metrics_listen,
            Some("127.0.0.1:0".parse().unwrap())
        );
        let mut c = Config {
            metrics_listen: Some("0.0.0.0:9464".parse().unwrap()),
            ..Config::default()
        };
        assert!(matches!(
            c.validate(),
            Err(ConfigError::NonLoopbackMetrics(_))
        ));
        c.api_allow_non_loopback = true;
        assert!(c.validate().is_ok());

        let mut c = Config::default();
        c.apply_env(|var| (var == "KITH_METRICS").then(|| "[::1]:9464".into()))
            .unwrap();
        assert_eq!(c.metrics_listen, Some("[::1]:9464".parse().unwrap()));
        c.apply_overrides(&ConfigOverrides {
            metrics_listen: Some("127.0.0.1:1".parse().unwrap()),
            ..ConfigOverrides::default()
        });
        assert_eq!(c.metrics_listen, Some("127.0.0.1:1".parse().unwrap()));
        let err = c
            .apply_env(|var| (var == "KITH_METRICS").then(|| "9464".into()))
            .unwrap_err();
        assert!(matches!(
            err,
            ConfigError::InvalidEnv {
                var: "KITH_METRICS",
                ..
            }
        ));
    }

    #[test]
    fn env_then_flags_precedence() {
        let mut c = Config::from_toml("network = \"file\"\nmdns = true").unwrap();
        c.apply_env(|var| match var {
            "KITH_NETWORK" => Some("env".into()),
            "KITH_MDNS" => Some("off".into()),
            "KITH_LISTEN" => Some("/ip4/127.0.0.1/tcp/1, /ip4/127.0.0.1/tcp/2".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.network, "env");
        assert!(!c.mdns);
        assert_eq!(c.listen.len(), 2);
        c.apply_overrides(&ConfigOverrides {
            network: Some("flag".to_owned()),
            listen: vec!["/ip4/127.0.0.1/tcp/3".to_owned()],
            ..ConfigOverrides::default()
        });
        assert_eq!(c.network, "flag");
        assert_eq!(c.listen, vec!["/ip4/127.0.0.1/tcp/3".to_owned()]);
    }

    #[test]
    fn bad_env_names_the_variable() {
        let mut c = Config::default();
        let err = c
            .apply_env(|var| (var == "KITH_MDNS").then(|| "maybe".into()))
            .unwrap_err();
        assert!(err.to_string().contains("KITH_MDNS"), "{err}");
        let err = c
            .apply_env(|var| (var == "KITH_API_LISTEN").then(|| "localhost".into()))
            .unwrap_err();
        assert!(matches!(
            err,
            ConfigError::InvalidEnv {
                var: "KITH_API_LISTEN",
                ..
            }
        ));
    }

    #[test]
    fn load_missing_file_gives_defaults_and_reports_parse_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Config::load(dir.path()).unwrap(), Config::default());
        std::fs::write(dir.path().join(CONFIG_FILE), "mdns = \"yes\"").unwrap();
        let err = Config::load(dir.path()).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }));
        assert!(err.to_string().contains("mdns"), "{err}");
    }

    #[test]
    fn data_dir_flag_wins() {
        let d = resolve_data_dir(Some(Path::new("/tmp/kith-x"))).unwrap();
        assert_eq!(d, PathBuf::from("/tmp/kith-x"));
    }
}
