//! Browser sessions of the web app: one-time login codes and session cookies.
//!
//! `kith open` asks the node for a login code (with the API token) and opens
//! `/app/login?code=…`; the node trades the code, once and within [`LOGIN_CODE_TTL`], for a
//! session secret that the browser keeps as an HttpOnly cookie. The node keeps only a
//! digest of each code and each session (a leaked `web-sessions` file does not log anyone
//! in), at most [`MAX_LOGIN_CODES`] codes and [`MAX_SESSIONS`] sessions, in memory, and the
//! sessions also in `<data_dir>/web-sessions` (mode 0600, replaced atomically), so a
//! restarted node keeps its browsers logged in.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use sha2::{Digest as _, Sha256};

use crate::identity::{self, IdentityError};

/// File name of the session digests inside the data directory.
pub const SESSIONS_FILE: &str = "web-sessions";
/// How long a login code can be traded for a session.
pub const LOGIN_CODE_TTL: Duration = Duration::from_secs(120);
/// Login codes kept at once; a new one pushes out the oldest.
pub const MAX_LOGIN_CODES: usize = 16;
/// How long a session lasts from its login.
pub const SESSION_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Sessions kept at once; a new login pushes out the one that ends first.
pub const MAX_SESSIONS: usize = 64;
/// Random bytes in a code or a session secret (sent as lowercase hex).
const SECRET_BYTES: usize = 32;

/// What is kept of a secret: the first 16 bytes of its SHA-256 (the file stays small, and a
/// digest of 32 random bytes gives nothing to guess from).
type Digest = [u8; 16];

/// A session that was just created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSession {
    /// The secret for the cookie (lowercase hex).
    pub secret: String,
    /// When it ends, in Unix milliseconds.
    pub expires_at_ms: u64,
}

/// Login codes and sessions of one node.
#[derive(Debug)]
pub struct Sessions {
    /// Where sessions are kept; `None` keeps them in memory only (tests).
    path: Option<PathBuf>,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Outstanding codes and when each stops being valid, oldest first.
    codes: Vec<(Digest, Instant)>,
    /// Sessions and when each ends (Unix ms).
    sessions: HashMap<Digest, u64>,
}

impl Sessions {
    /// Loads the sessions kept in `<data_dir>/web-sessions` (ended ones and lines that do
    /// not parse are dropped).
    pub fn open(data_dir: &Path) -> Result<Sessions, IdentityError> {
        let path = data_dir.join(SESSIONS_FILE);
        let mut sessions = HashMap::new();
        if let Some(bytes) = identity::read_secret_file_if_present(&path)? {
            let now = now_ms();
            for line in String::from_utf8_lossy(&bytes).lines() {
                match parse_line(line) {
                    Some((digest, expires)) if expires > now => {
                        sessions.insert(digest, expires);
                    }
                    Some(_) => {}
                    None => tracing::warn!(file = %path.display(), "skipping a malformed line"),
                }
            }
        }
        let mut inner = Inner {
            codes: Vec::new(),
            sessions,
        };
        inner.bound_sessions();
        Ok(Sessions {
            path: Some(path),
            inner: Mutex::new(inner),
        })
    }

    /// Sessions kept in memory only.
    pub fn in_memory() -> Sessions {
        Sessions {
            path: None,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// A fresh one-time login code.
    pub fn new_code(&self) -> String {
        let (code, digest) = fresh_secret();
        let now = Instant::now();
        let mut inner = self.lock();
        inner.codes.retain(|(_, until)| *until > now);
        if inner.codes.len() >= MAX_LOGIN_CODES {
            inner.codes.remove(0);
        }
        inner.codes.push((digest, now + LOGIN_CODE_TTL));
        code
    }

    /// Trades `code` for a new session; `None` if the code is unknown, used or too old.
    pub fn redeem(&self, code: &str) -> Option<NewSession> {
        let digest = digest_of(code)?;
        let now = Instant::now();
        let mut inner = self.lock();
        let index = inner.codes.iter().position(|(d, _)| *d == digest)?;
        let (_, until) = inner.codes.remove(index);
        if until <= now {
            return None;
        }
        let (secret, session) = fresh_secret();
        let expires_at_ms = now_ms().saturating_add(millis(SESSION_TTL));
        inner.sessions.insert(session, expires_at_ms);
        inner.bound_sessions();
        self.persist(&inner);
        Some(NewSession {
            secret,
            expires_at_ms,
        })
    }

    /// When the session of `secret` ends (Unix ms), if it is a live session.
    pub fn check(&self, secret: &str) -> Option<u64> {
        let digest = digest_of(secret)?;
        let now = now_ms();
        let inner = self.lock();
        inner
            .sessions
            .get(&digest)
            .copied()
            .filter(|expires| *expires > now)
    }

    /// Ends the session of `secret` (logout); unknown secrets are ignored.
    pub fn end(&self, secret: &str) {
        let Some(digest) = digest_of(secret) else {
            return;
        };
        let mut inner = self.lock();
        if inner.sessions.remove(&digest).is_some() {
            self.persist(&inner);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The maps are consistent after every statement, so a panic elsewhere leaves them usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the sessions to disk. A failure is logged: the session still works until the
    /// node stops, and the next change tries again.
    fn persist(&self, inner: &Inner) {
        let Some(path) = &self.path else { return };
        let mut text = String::with_capacity(inner.sessions.len() * 48);
        for (digest, expires) in &inner.sessions {
            text.push_str(&data_encoding::HEXLOWER.encode(digest));
            text.push(' ');
            text.push_str(&expires.to_string());
            text.push('\n');
        }
        if let Err(e) = identity::replace_secret_file(path, text.as_bytes()) {
            tracing::warn!(error = %e, "cannot keep the web sessions; they end when the node stops");
        }
    }
}

impl Inner {
    /// Drops ended sessions, then the ones ending first while there are too many.
    fn bound_sessions(&mut self) {
        let now = now_ms();
        self.sessions.retain(|_, expires| *expires > now);
        while self.sessions.len() > MAX_SESSIONS {
            let Some(first) = self
                .sessions
                .iter()
                .min_by_key(|(_, expires)| **expires)
                .map(|(d, _)| *d)
            else {
                break;
            };
            self.sessions.remove(&first);
        }
    }
}

fn fresh_secret() -> (String, Digest) {
    let mut bytes = [0u8; SECRET_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let secret = data_encoding::HEXLOWER.encode(&bytes);
    let digest = hash(&secret);
    (secret, digest)
}

/// The digest of a well-formed secret (64 lowercase hex digits); `None` for anything else.
fn digest_of(secret: &str) -> Option<Digest> {
    let well_formed = secret.len() == SECRET_BYTES * 2
        && secret
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    well_formed.then(|| hash(secret))
}

fn hash(secret: &str) -> Digest {
    let full: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
    let mut digest = [0u8; 16];
    digest.copy_from_slice(&full[..16]);
    digest
}

fn parse_line(line: &str) -> Option<(Digest, u64)> {
    let (hex, expires) = line.trim().split_once(' ')?;
    let bytes = data_encoding::HEXLOWER.decode(hex.as_bytes()).ok()?;
    let digest: Digest = bytes.try_into().ok()?;
    Some((digest, expires.parse().ok()?))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Now in Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(millis)
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_code_is_traded_once_for_a_session() {
        let sessions = Sessions::in_memory();
        let code = sessions.new_code();
        let session = sessions.redeem(&code).unwrap();
        assert!(sessions.check(&session.secret).is_some());
        assert_eq!(sessions.redeem(&code), None, "a code works once");
        assert_eq!(sessions.check(&code), None, "a code is not a session");
        sessions.end(&session.secret);
        assert_eq!(sessions.check(&session.secret), None);
    }

    #[test]
    fn malformed_and_unknown_secrets_are_refused() {
        let sessions = Sessions::in_memory();
        let _ = sessions.new_code();
        for bad in ["", "zz", &"A".repeat(64), &"0".repeat(64), &"0".repeat(65)] {
            assert_eq!(sessions.redeem(bad), None, "{bad}");
            assert_eq!(sessions.check(bad), None, "{bad}");
        }
    }

    #[test]
    fn an_expired_code_is_refused() {
        let sessions = Sessions::in_memory();
        let code = sessions.new_code();
        sessions.lock().codes[0].1 = Instant::now();
        assert_eq!(sessions.redeem(&code), None);
    }

    #[test]
    fn old_codes_are_pushed_out() {
        let sessions = Sessions::in_memory();
        let first = sessions.new_code();
        for _ in 0..MAX_LOGIN_CODES {
            let _ = sessions.new_code();
        }
        assert_eq!(sessions.lock().codes.len(), MAX_LOGIN_CODES);
        assert_eq!(sessions.redeem(&first), None);
    }

    #[test]
    fn sessions_are_bounded_and_the_first_to_end_goes() {
        let sessions = Sessions::in_memory();
        let first = sessions.redeem(&sessions.new_code()).unwrap();
        sessions
            .lock()
            .sessions
            .values_mut()
            .for_each(|expires| *expires -= 1000);
        let mut last = None;
        for _ in 0..MAX_SESSIONS {
            last = sessions.redeem(&sessions.new_code());
        }
        assert_eq!(sessions.lock().sessions.len(), MAX_SESSIONS);
        assert_eq!(sessions.check(&first.secret), None);
        assert!(sessions.check(&last.unwrap().secret).is_some());
    }

    #[test]
    fn sessions_survive_a_restart_and_the_file_holds_no_secret() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = Sessions::open(dir.path()).unwrap();
        let kept = sessions.redeem(&sessions.new_code()).unwrap();
        let ended = sessions.redeem(&sessions.new_code()).unwrap();
        sessions.end(&ended.secret);
        drop(sessions);
        let text = std::fs::read_to_string(dir.path().join(SESSIONS_FILE)).unwrap();
        assert!(!text.contains(&kept.secret));
        assert_eq!(text.lines().count(), 1);
        let again = Sessions::open(dir.path()).unwrap();
        assert_eq!(again.check(&kept.secret), Some(kept.expires_at_ms));
        assert_eq!(again.check(&ended.secret), None);
    }

    #[test]
    fn ended_and_malformed_lines_are_dropped_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SESSIONS_FILE);
        let live = "ab".repeat(16);
        let text = format!("{live} {}\n{} 1\nnot a line\n", u64::MAX, "cd".repeat(16));
        identity::replace_secret_file(&path, text.as_bytes()).unwrap();
        let sessions = Sessions::open(dir.path()).unwrap();
        assert_eq!(sessions.lock().sessions.len(), 1);
    }
}
