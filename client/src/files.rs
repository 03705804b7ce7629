//! How a local client finds a running node: the files the node writes into its data
//! directory for its clients, and how to read them.
//!
//! - `api.addr`: the address the running node's API is bound to (absent when no node runs).
//! - `api.token`: the API's bearer token, 64 hex characters, mode 0600.
//!
//! The node writes these files (`kith_node::identity`); this module is the one reader, so
//! the node and every client agree on their format.

use std::fs::File;
use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// File name of the API bearer token inside the data directory.
pub const API_TOKEN_FILE: &str = "api.token";
/// File name of the running node's API address inside the data directory.
pub const API_ADDR_FILE: &str = "api.addr";
/// Length of the API token in bytes (it is stored hex-encoded, twice as many characters).
pub const API_TOKEN_BYTES: usize = 32;
/// Largest accepted token or address file; anything bigger is not one of the node's.
const MAX_FILE_BYTES: u64 = 4096;

/// Why a node file could not be read. Each variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// A filesystem operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done ("read", …).
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
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
    /// The path is not a regular file.
    #[error("{0} is not a regular file")]
    NotAFile(PathBuf),
    /// The file is far larger than any token or address file.
    #[error("{path} is too large ({size} bytes) to be a Kith node file")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// The API token file does not hold a token.
    #[error("{0} does not hold a valid API token (expected 64 hex characters)")]
    BadToken(PathBuf),
    /// An address file (`api.addr`, `metrics.addr`) does not hold a socket address.
    #[error("{path} does not hold a socket address: '{value}'")]
    BadApiAddr {
        /// The file.
        path: PathBuf,
        /// What it holds (truncated).
        value: String,
    },
}

/// Reads `<data_dir>/api.addr`; `None` if the file does not exist (no node is running).
pub fn read_api_addr(data_dir: &Path) -> Result<Option<SocketAddr>, FileError> {
    read_addr_file(&data_dir.join(API_ADDR_FILE))
}

/// Reads an address file the node writes (`api.addr`, `metrics.addr`); `None` if it does
/// not exist.
pub fn read_addr_file(path: &Path) -> Result<Option<SocketAddr>, FileError> {
    let Some(bytes) = read_small_file(path, false)? else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&bytes);
    text.trim()
        .parse()
        .map(Some)
        .map_err(|_| FileError::BadApiAddr {
            path: path.to_owned(),
            value: text.trim().chars().take(64).collect(),
        })
}

/// Reads `<data_dir>/api.token` (lowercased); `None` if the file does not exist. A token
/// file that others can read, or that holds no token, is an error.
pub fn read_api_token(data_dir: &Path) -> Result<Option<String>, FileError> {
    let path = data_dir.join(API_TOKEN_FILE);
    let Some(bytes) = read_small_file(&path, true)? else {
        return Ok(None);
    };
    let token = std::str::from_utf8(&bytes)
        .map(str::trim)
        .map_err(|_| FileError::BadToken(path.clone()))?;
    if token.len() != API_TOKEN_BYTES * 2 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(FileError::BadToken(path));
    }
    Ok(Some(token.to_ascii_lowercase()))
}

/// Reads a small regular file; `None` if it does not exist. A `secret` file is refused if
/// group or others have any access to it.
fn read_small_file(path: &Path, secret: bool) -> Result<Option<Vec<u8>>, FileError> {
    let io = |source| FileError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    };
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(FileError::NotAFile(path.to_owned()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if secret && mode & 0o077 != 0 {
        return Err(FileError::InsecurePermissions {
            path: path.to_owned(),
            mode,
        });
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(FileError::TooLarge {
            path: path.to_owned(),
            size: meta.len(),
        });
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    Ok(Some(bytes))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    fn write(path: &Path, text: &str, mode: u32) {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn missing_files_mean_no_node() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_api_addr(dir.path()).unwrap(), None);
        assert_eq!(read_api_token(dir.path()).unwrap(), None);
    }

    #[test]
    fn files_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join(API_ADDR_FILE), "127.0.0.1:7342\n", 0o600);
        assert_eq!(
            read_api_addr(dir.path()).unwrap(),
            Some("127.0.0.1:7342".parse().unwrap())
        );
        write(&dir.path().join(API_TOKEN_FILE), &"AB".repeat(32), 0o600);
        assert_eq!(read_api_token(dir.path()).unwrap(), Some("ab".repeat(32)));

        let other = tempfile::tempdir().unwrap();
        write(&other.path().join(API_ADDR_FILE), "nonsense", 0o600);
        assert!(matches!(
            read_api_addr(other.path()),
            Err(FileError::BadApiAddr { .. })
        ));
        write(&other.path().join(API_TOKEN_FILE), "short\n", 0o600);
        assert!(matches!(
            read_api_token(other.path()),
            Err(FileError::BadToken(_))
        ));

        let open = tempfile::tempdir().unwrap();
        write(&open.path().join(API_TOKEN_FILE), &"ab".repeat(32), 0o644);
        assert!(matches!(
            read_api_token(open.path()),
            Err(FileError::InsecurePermissions { mode: 0o644, .. })
        ));
    }
}
