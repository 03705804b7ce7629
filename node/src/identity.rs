//! The node's files in its data directory: the node key, the API token and the API address.
//!
//! - `node.key`: the node's ed25519 libp2p key (protobuf-encoded), mode 0600. It is the
//!   node's identity (its PeerId); it is never overwritten once created.
//! - `api.token`: 32 random bytes as hex, mode 0600; the local API's bearer token.
//! - `api.addr`: the address the running node's API is bound to, for the CLI to find it.
//! - `metrics.addr`: the address the running node serves metrics on, when it does.
//!
//! Secret files are written to a temporary file and hard-linked into place, so a crash never
//! leaves a half-written key and two concurrent `init`s never overwrite each other.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use libp2p::PeerId;
use libp2p::identity::Keypair;
use rand::RngCore;

use crate::config::{CONFIG_FILE, Config, ConfigError, validate_network};

/// File name of the node key inside the data directory.
pub const KEY_FILE: &str = "node.key";
pub use kith_client::files::{API_ADDR_FILE, API_TOKEN_FILE};
use kith_client::files::{API_TOKEN_BYTES, FileError};
/// File name of the running node's metrics address inside the data directory.
pub const METRICS_ADDR_FILE: &str = "metrics.addr";
/// Largest accepted key, token or address file; anything bigger is not one of ours.
const MAX_SMALL_FILE_BYTES: u64 = 4096;

/// Why a node file could not be created or loaded. Each variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A filesystem operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done ("create", "read", …).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// There is no node key yet.
    #[error("no node key at {0}; run `kith init` first")]
    NoKey(PathBuf),
    /// The key file is empty (0 bytes): it was truncated or never written.
    #[error(
        "{0} is empty (0 bytes) and holds no node key: restore node.key from your backup, \
         or start over on purpose with a new identity: `kith run --new-identity`"
    )]
    EmptyKey(PathBuf),
    /// The key file does not hold a valid ed25519 key (damaged or not a Kith key).
    #[error(
        "{path} is damaged ({reason}): restore node.key from your backup, or start over on \
         purpose with a new identity: `kith run --new-identity`"
    )]
    BadKey {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: BadKeyReason,
    },
    /// A secret file can be read by other users; it is refused until fixed.
    #[error(
        "{path} is accessible by other users (mode {mode:03o}); fix it with `chmod 600 {path}`"
    )]
    InsecurePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A file we expect to be a regular file is something else.
    #[error("{0} is not a regular file")]
    NotAFile(PathBuf),
    /// The file is far larger than any key, token or address file.
    #[error("{path} is too large ({size} bytes) to be a Kith node file")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// A file the node writes for its clients (`api.token`, `api.addr`, `metrics.addr`)
    /// cannot be read back or does not hold what it should.
    #[error(transparent)]
    ClientFile(#[from] FileError),
    /// The network id given to `init` is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Why a node key file holds no usable key (the decoder's own words go to the debug log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadKeyReason {
    /// The bytes do not decode as a libp2p key.
    Undecodable,
    /// It is a key, but not ed25519 (Kith's only key type).
    NotEd25519,
}

impl std::fmt::Display for BadKeyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BadKeyReason::Undecodable => "it does not decode as a node key",
            BadKeyReason::NotEd25519 => "it is not an ed25519 key",
        })
    }
}

/// What [`init`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitOutcome {
    /// The node's PeerId (new or existing).
    pub peer_id: PeerId,
    /// Whether a new key was created (false: one existed and was kept).
    pub created: bool,
    /// Whether `config.toml` was written (false: one existed and was kept).
    pub config_created: bool,
}

/// Prepares a data directory: creates it (mode 0700), the node key and `config.toml` if
/// they are missing. Never overwrites anything, so running it twice is harmless.
/// `network` is written into a new `config.toml` (default `kith`).
pub fn init(data_dir: &Path, network: Option<&str>) -> Result<InitOutcome, IdentityError> {
    let network = network.unwrap_or(crate::config::DEFAULT_NETWORK);
    validate_network(network)?;
    create_data_dir(data_dir)?;
    let (key, created) = load_or_create_keypair(data_dir)?;
    let config_path = data_dir.join(CONFIG_FILE);
    let config_created = write_new_file(
        &config_path,
        Config::template_toml(network).as_bytes(),
        0o644,
    )?;
    Ok(InitOutcome {
        peer_id: key.public().to_peer_id(),
        created,
        config_created,
    })
}

/// Creates the data directory (and missing parents) with mode 0700. An existing directory
/// is left as it is.
pub fn create_data_dir(data_dir: &Path) -> Result<(), IdentityError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(io_err("create directory", data_dir))
}

/// Loads the node key from `<data_dir>/node.key`.
pub fn load_keypair(data_dir: &Path) -> Result<Keypair, IdentityError> {
    let path = data_dir.join(KEY_FILE);
    let bytes = match read_secret_file(&path) {
        Ok(bytes) => bytes,
        Err(IdentityError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(IdentityError::NoKey(path));
        }
        Err(e) => return Err(e),
    };
    // An empty buffer "decodes" as a key of the default (RSA) type, and libp2p then says a
    // cargo feature is missing: say what is really wrong instead.
    if bytes.is_empty() {
        return Err(IdentityError::EmptyKey(path));
    }
    let key = Keypair::from_protobuf_encoding(&bytes).map_err(|e| {
        tracing::debug!(path = %path.display(), error = %e, "node key does not decode");
        IdentityError::BadKey {
            path: path.clone(),
            reason: BadKeyReason::Undecodable,
        }
    })?;
    if key.clone().try_into_ed25519().is_err() {
        tracing::debug!(path = %path.display(), key_type = ?key.key_type(), "node key is not ed25519");
        return Err(IdentityError::BadKey {
            path,
            reason: BadKeyReason::NotEd25519,
        });
    }
    Ok(key)
}

/// Loads the node key, creating it first if there is none. Returns whether it was created.
/// The data directory must exist.
pub fn load_or_create_keypair(data_dir: &Path) -> Result<(Keypair, bool), IdentityError> {
    let path = data_dir.join(KEY_FILE);
    if !exists(&path)? {
        let key = Keypair::generate_ed25519();
        let bytes = key.to_protobuf_encoding().map_err(|e| IdentityError::Io {
            action: "encode a key for",
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        if write_new_file(&path, &bytes, 0o600)? {
            return Ok((key, true));
        }
        // Someone else created it meanwhile: theirs wins.
    }
    Ok((load_keypair(data_dir)?, false))
}

/// Returns the API token from `<data_dir>/api.token`, creating a fresh random one (mode
/// 0600) if there is none. Called by the node at start.
pub fn load_or_create_api_token(data_dir: &Path) -> Result<String, IdentityError> {
    let path = data_dir.join(API_TOKEN_FILE);
    if !exists(&path)? {
        let mut bytes = [0u8; API_TOKEN_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let token = data_encoding::HEXLOWER.encode(&bytes);
        if write_new_file(&path, format!("{token}\n").as_bytes(), 0o600)? {
            return Ok(token);
        }
    }
    read_api_token(data_dir)
}

/// Reads the API token back. Fails if there is none or it is malformed.
pub fn read_api_token(data_dir: &Path) -> Result<String, IdentityError> {
    kith_client::files::read_api_token(data_dir)?.ok_or_else(|| IdentityError::Io {
        action: "read",
        path: data_dir.join(API_TOKEN_FILE),
        source: std::io::ErrorKind::NotFound.into(),
    })
}

/// Records the address the node's API is bound to in `<data_dir>/api.addr` (replacing an
/// old one atomically), so the CLI can find the node.
pub fn write_api_addr(data_dir: &Path, addr: SocketAddr) -> Result<(), IdentityError> {
    write_addr_file(&data_dir.join(API_ADDR_FILE), addr)
}

/// Records the address the node serves metrics on in `<data_dir>/metrics.addr` (replacing
/// an old one atomically), so tools can find it.
pub fn write_metrics_addr(data_dir: &Path, addr: SocketAddr) -> Result<(), IdentityError> {
    write_addr_file(&data_dir.join(METRICS_ADDR_FILE), addr)
}

/// Reads `<data_dir>/metrics.addr`; `None` if the file does not exist.
pub fn read_metrics_addr(data_dir: &Path) -> Result<Option<SocketAddr>, IdentityError> {
    Ok(kith_client::files::read_addr_file(
        &data_dir.join(METRICS_ADDR_FILE),
    )?)
}

/// Removes `<data_dir>/metrics.addr` (at node shutdown); a missing file is fine.
pub fn remove_metrics_addr(data_dir: &Path) -> Result<(), IdentityError> {
    remove_if_present(data_dir.join(METRICS_ADDR_FILE))
}

fn write_addr_file(path: &Path, addr: SocketAddr) -> Result<(), IdentityError> {
    replace_secret_file(path, format!("{addr}\n").as_bytes())
}

/// Replaces `path` atomically with `contents` (mode 0600, synced before the rename), for
/// small node files that change while the node runs (`api.addr`, `web-sessions`).
pub fn replace_secret_file(path: &Path, contents: &[u8]) -> Result<(), IdentityError> {
    let path = path.to_owned();
    let tmp = temp_path(&path);
    write_exclusive(&tmp, contents, 0o600)?;
    std::fs::rename(&tmp, &path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        IdentityError::Io {
            action: "write",
            path: path.clone(),
            source: e,
        }
    })
}

/// Removes `<data_dir>/api.addr` (at node shutdown); a missing file is fine.
pub fn remove_api_addr(data_dir: &Path) -> Result<(), IdentityError> {
    remove_if_present(data_dir.join(API_ADDR_FILE))
}

fn remove_if_present(path: PathBuf) -> Result<(), IdentityError> {
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(IdentityError::Io {
            action: "remove",
            path,
            source: e,
        }),
    }
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError {
    let path = path.to_owned();
    move |source| IdentityError::Io {
        action,
        path,
        source,
    }
}

fn exists(path: &Path) -> Result<bool, IdentityError> {
    path.try_exists().map_err(io_err("inspect", path))
}

/// Reads a small secret file written by [`replace_secret_file`]; `None` if there is none.
pub fn read_secret_file_if_present(path: &Path) -> Result<Option<Vec<u8>>, IdentityError> {
    match File::open(path) {
        Ok(file) => read_open_file(path, file, true).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

/// Reads a small secret file, refusing it if group or others have any access to it.
fn read_secret_file(path: &Path) -> Result<Vec<u8>, IdentityError> {
    let file = File::open(path).map_err(io_err("read", path))?;
    read_open_file(path, file, true)
}

fn read_open_file(path: &Path, file: File, secret: bool) -> Result<Vec<u8>, IdentityError> {
    let meta = file.metadata().map_err(io_err("read", path))?;
    if !meta.is_file() {
        return Err(IdentityError::NotAFile(path.to_owned()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if secret && mode & 0o077 != 0 {
        return Err(IdentityError::InsecurePermissions {
            path: path.to_owned(),
            mode,
        });
    }
    if meta.len() > MAX_SMALL_FILE_BYTES {
        return Err(IdentityError::TooLarge {
            path: path.to_owned(),
            size: meta.len(),
        });
    }
    let mut bytes = Vec::new();
    file.take(MAX_SMALL_FILE_BYTES)
        .read_to_end(&mut bytes)
        .map_err(io_err("read", path))?;
    Ok(bytes)
}

/// A unique temporary name next to `path`.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let suffix = rand::rngs::OsRng.next_u64();
    path.with_file_name(format!(".{name}.{suffix:016x}.tmp"))
}

/// Creates `path` with `contents` and `mode`, failing if it exists; the data is synced.
fn write_exclusive(path: &Path, contents: &[u8], mode: u32) -> Result<(), IdentityError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err("create", path))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| {
            let _ = std::fs::remove_file(path);
            IdentityError::Io {
                action: "write",
                path: path.to_owned(),
                source: e,
            }
        })
}

/// Creates `path` with `contents` unless it exists; returns whether it was created.
/// Writes a temporary file and hard-links it into place, so `path` only ever appears
/// complete; on filesystems without hard links, falls back to writing `path` directly.
fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<bool, IdentityError> {
    if exists(path)? {
        return Ok(false);
    }
    let tmp = temp_path(path);
    write_exclusive(&tmp, contents, mode)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(_) => match write_exclusive(path, contents, mode) {
            Ok(()) => Ok(true),
            Err(IdentityError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn init_twice_keeps_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("node");
        let first = init(&data, None).unwrap();
        assert!(first.created && first.config_created);
        let key_bytes = std::fs::read(data.join(KEY_FILE)).unwrap();
        let config_text = std::fs::read_to_string(data.join(CONFIG_FILE)).unwrap();

        let second = init(&data, Some("other")).unwrap();
        assert!(!second.created && !second.config_created);
        assert_eq!(first.peer_id, second.peer_id);
        assert_eq!(std::fs::read(data.join(KEY_FILE)).unwrap(), key_bytes);
        assert_eq!(
            std::fs::read_to_string(data.join(CONFIG_FILE)).unwrap(),
            config_text
        );
        assert_eq!(
            load_keypair(&data).unwrap().public().to_peer_id(),
            first.peer_id
        );
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(&data)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn init_writes_network_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("a").join("b");
        init(&data, Some("testnet-1")).unwrap();
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&data.join(KEY_FILE)), 0o600);
        assert_eq!(Config::load(&data).unwrap().network, "testnet-1");
    }

    #[test]
    fn init_refuses_bad_network() {
        let dir = tempfile::tempdir().unwrap();
        let err = init(dir.path(), Some("bad net")).unwrap_err();
        assert!(matches!(err, IdentityError::Config(_)), "{err}");
        assert!(!dir.path().join(KEY_FILE).exists());
    }

    #[test]
    fn missing_key_says_run_init() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_keypair(dir.path()).unwrap_err();
        assert!(matches!(err, IdentityError::NoKey(_)));
        assert!(err.to_string().contains("kith init"));
    }

    #[test]
    fn garbage_key_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        write_exclusive(&path, b"this is not a key", 0o600).unwrap();
        assert!(matches!(
            load_keypair(dir.path()),
            Err(IdentityError::BadKey { .. })
        ));
        // load_or_create does not replace a damaged key.
        assert!(load_or_create_keypair(dir.path()).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"this is not a key");
    }

    #[test]
    fn empty_key_says_so_and_how_to_recover() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        write_exclusive(&path, b"", 0o600).unwrap();
        let err = load_keypair(dir.path()).unwrap_err();
        assert!(matches!(err, IdentityError::EmptyKey(_)), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("empty") && text.contains("node.key"),
            "{text}"
        );
        assert!(
            text.contains("--new-identity") && text.contains("backup"),
            "{text}"
        );
        assert!(!text.contains("rsa") && !text.contains("feature"), "{text}");
        // Neither init nor a start replaces it.
        assert!(init(dir.path(), None).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"");
        // A key of another type is named as such, not as a missing cargo feature.
        std::fs::remove_file(&path).unwrap();
        write_exclusive(&path, &[0x08, 0x00, 0x12, 0x01, 0x00], 0o600).unwrap();
        let err = load_keypair(dir.path()).unwrap_err();
        assert!(matches!(err, IdentityError::BadKey { .. }), "{err}");
        assert!(!err.to_string().contains("feature"), "{err}");
    }

    #[test]
    fn readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), None).unwrap();
        let path = dir.path().join(KEY_FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_keypair(dir.path()).unwrap_err();
        assert!(
            matches!(err, IdentityError::InsecurePermissions { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"));
    }

    #[test]
    fn api_token_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let token = load_or_create_api_token(dir.path()).unwrap();
        assert_eq!(token.len(), 64);
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(mode(&dir.path().join(API_TOKEN_FILE)), 0o600);
        assert_eq!(load_or_create_api_token(dir.path()).unwrap(), token);
        assert_eq!(read_api_token(dir.path()).unwrap(), token);
    }

    #[test]
    fn bad_token_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_exclusive(&dir.path().join(API_TOKEN_FILE), b"short\n", 0o600).unwrap();
        assert!(matches!(
            read_api_token(dir.path()),
            Err(IdentityError::ClientFile(FileError::BadToken(_)))
        ));
        assert!(load_or_create_api_token(dir.path()).is_err());
    }

    #[test]
    fn api_addr_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(kith_client::files::read_api_addr(dir.path()).unwrap(), None);
        let addr: SocketAddr = "127.0.0.1:45678".parse().unwrap();
        write_api_addr(dir.path(), addr).unwrap();
        assert_eq!(
            kith_client::files::read_api_addr(dir.path()).unwrap(),
            Some(addr)
        );
        let addr2: SocketAddr = "[::1]:1".parse().unwrap();
        write_api_addr(dir.path(), addr2).unwrap();
        assert_eq!(
            kith_client::files::read_api_addr(dir.path()).unwrap(),
            Some(addr2)
        );
        remove_api_addr(dir.path()).unwrap();
        remove_api_addr(dir.path()).unwrap();
        assert_eq!(kith_client::files::read_api_addr(dir.path()).unwrap(), None);
        // The metrics address lives beside it, independently.
        write_metrics_addr(dir.path(), addr).unwrap();
        assert_eq!(read_metrics_addr(dir.path()).unwrap(), Some(addr));
        assert_eq!(kith_client::files::read_api_addr(dir.path()).unwrap(), None);
        remove_metrics_addr(dir.path()).unwrap();
        remove_metrics_addr(dir.path()).unwrap();
        assert_eq!(read_metrics_addr(dir.path()).unwrap(), None);

        std::fs::write(dir.path().join(API_ADDR_FILE), "nonsense").unwrap();
        assert!(matches!(
            kith_client::files::read_api_addr(dir.path()),
            Err(FileError::BadApiAddr { .. })
        ));
    }
}
