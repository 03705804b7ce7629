//! The start check: the node key and the database of a data directory belong together.
//!
//! A node's groups live in `kith.redb` and can only be used with the key that joined them
//! (`node.key`); the database records that key's PeerId (see [`Store::open_owned`]). Before a
//! node starts, [`open`] refuses, with one error naming the files and the way out:
//!
//! - a `node.key` that is empty or damaged;
//! - a `node.key` that is missing while the directory shows earlier use (a non-empty
//!   `kith.redb`, or `api.token`, which every start writes);
//! - a `kith.redb` that is missing or empty while the directory shows earlier use;
//! - a `kith.redb` that belongs to another node key.
//!
//! The way out is to restore the backup of both files, or to start over on purpose with a
//! [`Recovery`] flag, which sets the files that do not fit aside (renamed, never deleted).
//! The flags only act when the check refuses: on a data directory that fits together they
//! change nothing, so a flag left in a service file cannot wipe a working node.

use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;

use crate::identity::{self, API_TOKEN_FILE, IdentityError, KEY_FILE};
use crate::store::{Store, StoreError};

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "kith.redb";

/// What `kith run` may set aside when the start check refuses (its recovery flags).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Recovery {
    /// Refuse to start (the default): restore the backup instead.
    #[default]
    Refuse,
    /// `--fresh-database`: keep the node key, set aside a database that is missing, empty or
    /// another key's, and start with an empty database.
    FreshDatabase,
    /// `--new-identity`: set aside the node key (missing, damaged or not the database's) and
    /// the database, and start with a new key and an empty database.
    NewIdentity,
}

impl Recovery {
    /// The `kith run` flag that asks for this recovery.
    pub fn flag(self) -> &'static str {
        match self {
            Recovery::Refuse => "",
            Recovery::FreshDatabase => "--fresh-database",
            Recovery::NewIdentity => "--new-identity",
        }
    }
}

/// How a database file looks before it is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    /// There is no file.
    Missing,
    /// The file has 0 bytes (truncated).
    Empty,
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Lost::Missing => "missing",
            Lost::Empty => "empty (0 bytes)",
        })
    }
}

/// Why the data directory cannot be used as it is. Each message names the files and how to
/// recover.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// The key is not the one the database belongs to.
    #[error(
        "{key} (node {key_peer}) does not belong to {db} (node {db_owner}): restore the \
         node.key of node {db_owner} from your backup, or start over on purpose with this key \
         and an empty database: `kith run --fresh-database`"
    )]
    KeyMismatch {
        /// The key file.
        key: PathBuf,
        /// The database file.
        db: PathBuf,
        /// The key's PeerId (as text: the error only names it).
        key_peer: String,
        /// The PeerId the database belongs to.
        db_owner: String,
    },
    /// There is no key, yet the directory was used.
    #[error(
        "{key} is missing, but this data directory was used before ({evidence} exists{}): \
         restore node.key from your backup, or start over on purpose with a new identity and \
         an empty database: `kith run --new-identity`",
        owned_by(.db_owner)
    )]
    KeyMissing {
        /// The key file.
        key: PathBuf,
        /// The file that shows earlier use.
        evidence: PathBuf,
        /// Whose the database is (PeerId), if it says.
        db_owner: Option<String>,
    },
    /// The database is missing or empty, yet the directory was used.
    #[error(
        "{db} is {state}, but this data directory was used before ({evidence} exists): \
         restore kith.redb (with its node.key) from your backup, or start over on purpose \
         with an empty database: `kith run --fresh-database`"
    )]
    DatabaseLost {
        /// The database file.
        db: PathBuf,
        /// Missing or empty.
        state: Lost,
        /// The file that shows earlier use.
        evidence: PathBuf,
    },
    /// The node key cannot be read or created.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The database cannot be opened.
    #[error("cannot open the database {path}: {source}")]
    Store {
        /// The database file.
        path: PathBuf,
        /// Why.
        source: StoreError,
    },
    /// A file could not be set aside for a fresh start.
    #[error("cannot set {path} aside: {source}")]
    SetAside {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

fn owned_by(owner: &Option<String>) -> String {
    owner
        .as_ref()
        .map(|p| format!(", and kith.redb belongs to node {p}"))
        .unwrap_or_default()
}

/// A data directory whose key and database fit together.
#[derive(Debug)]
pub struct Opened {
    /// The node key.
    pub keypair: Keypair,
    /// Whether the key was created now.
    pub created_key: bool,
    /// The open database (owned by `keypair`).
    pub store: Store,
    /// Files set aside for a fresh start: (old name, new name).
    pub set_aside: Vec<(PathBuf, PathBuf)>,
}

/// Loads the node key and opens the database of `data_dir` (creating both on first use),
/// after checking they belong together; `recovery` says what may be set aside if they do
/// not. See the module documentation.
pub fn open(data_dir: &Path, recovery: Recovery) -> Result<Opened, DataDirError> {
    identity::create_data_dir(data_dir)?;
    let key_path = data_dir.join(KEY_FILE);
    let db_path = data_dir.join(DB_FILE);
    let mut set_aside = Vec::new();
    // Whether the check refused and `recovery` was applied.
    let mut acted = false;

    let key = match identity::load_keypair(data_dir) {
        Ok(key) => Some(key),
        Err(IdentityError::NoKey(_)) => match earlier_use(data_dir)? {
            None => None,
            Some(evidence) if recovery == Recovery::NewIdentity => {
                tracing::debug!(evidence = %evidence.display(), "no node key in a used directory");
                acted = true;
                set_aside_if_present(&db_path, &mut set_aside)?;
                None
            }
            Some(evidence) => {
                return Err(DataDirError::KeyMissing {
                    key: key_path,
                    db_owner: owner_of(&db_path),
                    evidence,
                });
            }
        },
        Err(e @ (IdentityError::EmptyKey(_) | IdentityError::BadKey { .. })) => {
            if recovery != Recovery::NewIdentity {
                return Err(e.into());
            }
            acted = true;
            set_aside_if_present(&key_path, &mut set_aside)?;
            set_aside_if_present(&db_path, &mut set_aside)?;
            None
        }
        Err(e) => return Err(e.into()),
    };
    let key = match key {
        Some(key) => {
            if let Some(lost) = lost_database(&db_path)?
                && let Some(evidence) = earlier_use(data_dir)?
            {
                match recovery {
                    Recovery::Refuse => {
                        return Err(DataDirError::DatabaseLost {
                            db: db_path,
                            state: lost,
                            evidence,
                        });
                    }
                    Recovery::FreshDatabase => {
                        acted = true;
                        set_aside_if_present(&db_path, &mut set_aside)?;
                        Some(key)
                    }
                    Recovery::NewIdentity => {
                        acted = true;
                        set_aside_if_present(&key_path, &mut set_aside)?;
                        set_aside_if_present(&db_path, &mut set_aside)?;
                        None
                    }
                }
            } else {
                Some(key)
            }
        }
        None => None,
    };
    let (keypair, created_key) = match key {
        Some(key) => (key, false),
        None => identity::load_or_create_keypair(data_dir)?,
    };
    let peer = keypair.public().to_peer_id();
    let store = match Store::open_owned(&db_path, &peer) {
        Ok(store) => store,
        Err(StoreError::OtherOwner { owner }) => {
            if recovery == Recovery::Refuse {
                return Err(DataDirError::KeyMismatch {
                    key: key_path,
                    db: db_path,
                    key_peer: peer.to_string(),
                    db_owner: owner.to_string(),
                });
            }
            // Both flags set the database aside; `--new-identity` also the key.
            set_aside_if_present(&db_path, &mut set_aside)?;
            if recovery == Recovery::NewIdentity {
                set_aside_if_present(&key_path, &mut set_aside)?;
                let (keypair, _) = identity::load_or_create_keypair(data_dir)?;
                return finish(keypair, true, &db_path, set_aside, recovery);
            }
            return finish(keypair, created_key, &db_path, set_aside, recovery);
        }
        Err(source) => {
            return Err(DataDirError::Store {
                path: db_path,
                source,
            });
        }
    };
    if !acted && recovery != Recovery::Refuse {
        tracing::warn!(
            flag = recovery.flag(),
            "node.key and kith.redb belong together; nothing to start over from, the flag changes nothing"
        );
    }
    report(&set_aside, recovery);
    Ok(Opened {
        keypair,
        created_key,
        store,
        set_aside,
    })
}

/// Opens the (now empty) database for `keypair` after files were set aside.
fn finish(
    keypair: Keypair,
    created_key: bool,
    db_path: &Path,
    set_aside: Vec<(PathBuf, PathBuf)>,
    recovery: Recovery,
) -> Result<Opened, DataDirError> {
    let peer = keypair.public().to_peer_id();
    let store = Store::open_owned(db_path, &peer).map_err(|source| DataDirError::Store {
        path: db_path.to_owned(),
        source,
    })?;
    report(&set_aside, recovery);
    Ok(Opened {
        keypair,
        created_key,
        store,
        set_aside,
    })
}

fn report(set_aside: &[(PathBuf, PathBuf)], recovery: Recovery) {
    for (from, to) in set_aside {
        tracing::warn!(
            flag = recovery.flag(),
            from = %from.display(),
            to = %to.display(),
            "starting over on purpose: set a file aside"
        );
    }
}

/// Checks, for `kith init`, that a missing node key may be created: not if the directory
/// was used before (the key was lost; `kith run --new-identity` starts over on purpose).
pub fn check_init(data_dir: &Path) -> Result<(), DataDirError> {
    let key = data_dir.join(KEY_FILE);
    if key
        .try_exists()
        .map_err(|source| inspect_err(&key, source))?
    {
        return Ok(());
    }
    match earlier_use(data_dir)? {
        None => Ok(()),
        Some(evidence) => Err(DataDirError::KeyMissing {
            db_owner: owner_of(&data_dir.join(DB_FILE)),
            key,
            evidence,
        }),
    }
}

/// The first file that shows the directory was used by a node: a non-empty database, or
/// the API token every start writes.
fn earlier_use(data_dir: &Path) -> Result<Option<PathBuf>, DataDirError> {
    let db = data_dir.join(DB_FILE);
    if lost_database(&db)?.is_none() {
        return Ok(Some(db));
    }
    let token = data_dir.join(API_TOKEN_FILE);
    if token
        .try_exists()
        .map_err(|source| inspect_err(&token, source))?
    {
        return Ok(Some(token));
    }
    Ok(None)
}

/// `Some` if the database file is missing or empty.
fn lost_database(path: &Path) -> Result<Option<Lost>, DataDirError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.len() == 0 => Ok(Some(Lost::Empty)),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Some(Lost::Missing)),
        Err(source) => Err(inspect_err(path, source)),
    }
}

fn inspect_err(path: &Path, source: std::io::Error) -> DataDirError {
    DataDirError::Identity(IdentityError::Io {
        action: "inspect",
        path: path.to_owned(),
        source,
    })
}

/// The database's recorded owner, for an error message; `None` if it cannot be read.
fn owner_of(db: &Path) -> Option<String> {
    if lost_database(db).ok()?.is_some() {
        return None;
    }
    Store::owner_of(db)
        .inspect_err(|e| tracing::debug!(error = %e, "cannot read the database's owner"))
        .ok()
        .flatten()
        .map(|p| p.to_string())
}

/// Renames `path` to `<name>.old-<unix seconds>` (or `…-<n>` if taken), if it exists.
fn set_aside_if_present(
    path: &Path,
    done: &mut Vec<(PathBuf, PathBuf)>,
) -> Result<(), DataDirError> {
    let err = |source| DataDirError::SetAside {
        path: path.to_owned(),
        source,
    };
    if !path.try_exists().map_err(err)? {
        return Ok(());
    }
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for n in 0u32..1000 {
        let suffix = if n == 0 {
            format!("{name}.old-{secs}")
        } else {
            format!("{name}.old-{secs}-{n}")
        };
        let to = path.with_file_name(suffix);
        if to.try_exists().map_err(err)? {
            continue;
        }
        std::fs::rename(path, &to).map_err(err)?;
        done.push((path.to_owned(), to));
        return Ok(());
    }
    Err(err(std::io::Error::from(std::io::ErrorKind::AlreadyExists)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use libp2p::PeerId;

    fn start(dir: &Path, recovery: Recovery) -> Result<Opened, DataDirError> {
        open(dir, recovery)
    }

    /// A directory after one start: key, database and API token.
    fn used_dir() -> (tempfile::TempDir, PeerId) {
        let dir = tempfile::tempdir().unwrap();
        let opened = start(dir.path(), Recovery::Refuse).unwrap();
        assert!(opened.created_key);
        identity::load_or_create_api_token(dir.path()).unwrap();
        (dir, opened.keypair.public().to_peer_id())
    }

    fn other_key(dir: &Path) -> PeerId {
        let key = Keypair::generate_ed25519();
        std::fs::remove_file(dir.join(KEY_FILE)).unwrap();
        std::fs::write(dir.join(KEY_FILE), key.to_protobuf_encoding().unwrap()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join(KEY_FILE), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        key.public().to_peer_id()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_fresh_directory_starts_and_restarts() {
        let (dir, peer) = used_dir();
        let again = start(dir.path(), Recovery::Refuse).unwrap();
        assert!(!again.created_key && again.set_aside.is_empty());
        assert_eq!(again.keypair.public().to_peer_id(), peer);
        drop(again);
        // A flag on a directory that fits together changes nothing.
        let flagged = start(dir.path(), Recovery::NewIdentity).unwrap();
        assert_eq!(flagged.keypair.public().to_peer_id(), peer);
        assert!(flagged.set_aside.is_empty());
    }

    #[test]
    fn a_swapped_key_is_refused_until_asked_to_start_over() {
        let (dir, old) = used_dir();
        let new = other_key(dir.path());
        let err = start(dir.path(), Recovery::Refuse).unwrap_err();
        assert!(matches!(err, DataDirError::KeyMismatch { .. }), "{err}");
        let text = err.to_string();
        for part in [
            "node.key",
            "kith.redb",
            "--fresh-database",
            &old.to_string(),
        ] {
            assert!(text.contains(part), "{part} missing in {text}");
        }
        // Refusing left both files as they were.
        assert_eq!(
            Store::owner_of(&dir.path().join(DB_FILE)).unwrap(),
            Some(old)
        );
        let fresh = start(dir.path(), Recovery::FreshDatabase).unwrap();
        assert_eq!(fresh.keypair.public().to_peer_id(), new);
        assert_eq!(fresh.set_aside.len(), 1);
        assert!(fresh.set_aside[0].1.exists());
        assert_eq!(fresh.store.groups().unwrap(), vec![]);
        drop(fresh);
        assert_eq!(
            Store::owner_of(&dir.path().join(DB_FILE)).unwrap(),
            Some(new)
        );
    }

    #[test]
    fn a_missing_key_next_to_a_used_database_is_refused() {
        let (dir, old) = used_dir();
        std::fs::remove_file(dir.path().join(KEY_FILE)).unwrap();
        let err = start(dir.path(), Recovery::Refuse).unwrap_err();
        assert!(matches!(err, DataDirError::KeyMissing { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("--new-identity") && text.contains(&old.to_string()),
            "{text}"
        );
        assert!(!dir.path().join(KEY_FILE).exists(), "no key was made");
        assert!(check_init(dir.path()).is_err());
        // --fresh-database keeps a key, and there is none: still refused.
        assert!(start(dir.path(), Recovery::FreshDatabase).is_err());
        let fresh = start(dir.path(), Recovery::NewIdentity).unwrap();
        assert!(fresh.created_key);
        assert_ne!(fresh.keypair.public().to_peer_id(), old);
        assert_eq!(fresh.set_aside.len(), 1, "{:?}", fresh.set_aside);
    }

    #[test]
    fn an_empty_database_of_a_used_directory_is_refused() {
        let (dir, peer) = used_dir();
        std::fs::File::create(dir.path().join(DB_FILE)).unwrap();
        let err = start(dir.path(), Recovery::Refuse).unwrap_err();
        assert!(
            matches!(
                err,
                DataDirError::DatabaseLost {
                    state: Lost::Empty,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("--fresh-database"), "{err}");
        std::fs::remove_file(dir.path().join(DB_FILE)).unwrap();
        let err = start(dir.path(), Recovery::Refuse).unwrap_err();
        assert!(
            matches!(
                err,
                DataDirError::DatabaseLost {
                    state: Lost::Missing,
                    ..
                }
            ),
            "{err}"
        );
        let fresh = start(dir.path(), Recovery::FreshDatabase).unwrap();
        assert_eq!(fresh.keypair.public().to_peer_id(), peer);
    }

    #[test]
    fn a_damaged_key_is_set_aside_only_on_request() {
        let (dir, old) = used_dir();
        std::fs::write(dir.path().join(KEY_FILE), b"").unwrap();
        let err = start(dir.path(), Recovery::Refuse).unwrap_err();
        assert!(
            matches!(err, DataDirError::Identity(IdentityError::EmptyKey(_))),
            "{err}"
        );
        let fresh = start(dir.path(), Recovery::NewIdentity).unwrap();
        assert_ne!(fresh.keypair.public().to_peer_id(), old);
        assert_eq!(fresh.set_aside.len(), 2);
        let listed = names(dir.path());
        assert!(
            listed.iter().any(|n| n.starts_with("node.key.old-"))
                && listed.iter().any(|n| n.starts_with("kith.redb.old-")),
            "{listed:?}"
        );
    }

    #[test]
    fn init_after_init_and_on_a_fresh_directory_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        check_init(dir.path()).unwrap();
        identity::init(dir.path(), None).unwrap();
        check_init(dir.path()).unwrap();
        // `kith init` then the first `kith run`: the database is new, not lost.
        start(dir.path(), Recovery::Refuse).unwrap();
    }
}
