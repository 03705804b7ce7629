//! The chat client's way to the node, shared by the event stream and the request worker.
//! The node's API port is 0 by default, so a node started again listens elsewhere: when a
//! request or the stream fails, [`Link::reread`] reads `<data_dir>/api.addr` and
//! `api.token` again and, if they changed, every later request uses the new address.
//! With an explicit `--api` (or `KITH_API`) the address is never re-read.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use kith_client::{Client, files};

/// Where the node is now; cheap to clone (all clones share it).
#[derive(Debug, Clone)]
pub struct Link {
    current: Arc<Mutex<Current>>,
    /// The data directory to re-read, unless the address was given explicitly.
    data_dir: Option<PathBuf>,
}

#[derive(Debug)]
struct Current {
    client: Client,
    /// The address and token the client was made from (`None`: not read from files).
    from: Option<(SocketAddr, String)>,
}

impl Link {
    /// A link starting with `client`; `data_dir` is re-read on failures (`None`: the
    /// address was given explicitly, keep it).
    pub fn new(client: Client, data_dir: Option<PathBuf>) -> Link {
        let from = data_dir.as_ref().and_then(|d| read(d));
        Link {
            current: Arc::new(Mutex::new(Current { client, from })),
            data_dir,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Current> {
        // Nothing panics while holding it; a poisoned lock still holds a usable client.
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The client to use now.
    pub fn client(&self) -> Client {
        self.lock().client.clone()
    }

    /// Reads the node's address and token again; true if they changed (the client now
    /// talks to the new address), false if they are the same, absent or unreadable (the
    /// node may be starting), or the address is explicit.
    pub fn reread(&self) -> bool {
        let Some(dir) = &self.data_dir else {
            return false;
        };
        let Some((addr, token)) = read(dir) else {
            return false;
        };
        let mut current = self.lock();
        if current.from.as_ref() == Some(&(addr, token.clone())) {
            return false;
        }
        match Client::new(&format!("http://{addr}/"), token.clone()) {
            Ok(client) => {
                current.client = client;
                current.from = Some((addr, token));
                true
            }
            Err(_) => false,
        }
    }
}

/// The address and token in `dir`, if both are there and readable.
fn read(dir: &std::path::Path) -> Option<(SocketAddr, String)> {
    let addr = files::read_api_addr(dir).ok().flatten()?;
    let token = files::read_api_token(dir).ok().flatten()?;
    Some((addr, token))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::identity;

    #[test]
    fn a_new_address_in_the_data_dir_is_picked_up() {
        let dir = tempfile::tempdir().unwrap();
        identity::load_or_create_api_token(dir.path()).unwrap();
        let first: SocketAddr = "127.0.0.1:4001".parse().unwrap();
        identity::write_api_addr(dir.path(), first).unwrap();
        let client = Client::from_data_dir(dir.path(), None).unwrap();
        let link = Link::new(client, Some(dir.path().to_owned()));
        // The same files: nothing to change.
        assert!(!link.reread());
        // The node stopped (no address file): keep trying the old one.
        identity::remove_api_addr(dir.path()).unwrap();
        assert!(!link.reread());
        // Started again elsewhere: the new address, once.
        let second: SocketAddr = "127.0.0.1:4002".parse().unwrap();
        identity::write_api_addr(dir.path(), second).unwrap();
        assert!(link.reread());
        assert!(!link.reread());
        assert_eq!(
            link.lock().from.as_ref().map(|(a, _)| *a),
            Some(second),
            "{link:?}"
        );
        // Every clone shares the new client.
        let other = link.clone();
        identity::write_api_addr(dir.path(), first).unwrap();
        assert!(other.reread());
        assert_eq!(link.lock().from.as_ref().map(|(a, _)| *a), Some(first));
    }

    #[test]
    fn an_explicit_address_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        identity::load_or_create_api_token(dir.path()).unwrap();
        identity::write_api_addr(dir.path(), "127.0.0.1:4001".parse().unwrap()).unwrap();
        let client = Client::new("http://127.0.0.1:9/", "00".repeat(32)).unwrap();
        let link = Link::new(client, None);
        assert!(!link.reread());
        assert!(link.lock().from.is_none());
    }
}
