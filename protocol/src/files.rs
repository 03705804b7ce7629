//! Files and pictures: what a file message carries, how a file is cut into encrypted chunks
//! that each check on arrival, and the request-response messages members fetch chunks with
//! (`/kith/file/1.0.0`). See docs/PROTOCOL.md, "Files".
//!
//! A file travels in two parts. The *file message* ([`FileRef`], inside a chat message on
//! gossip) carries only its name, size, type, id, a fresh key and, for pictures, the
//! dimensions and a small thumbnail. The *content* is encrypted chunk by chunk with that key
//! (ChaCha20-Poly1305, the chunk's index as nonce) and fetched from any member that holds
//! it, never through gossipsub:
//!
//! - chunk *i* is the plaintext bytes `i·chunk_bytes ..` (the last one shorter), sealed to
//!   `cipher_i` (16 bytes longer);
//! - its *leaf* is `SHA-256("kith file chunk v1\0" ‖ cipher_i)`;
//! - the *manifest* is the list of leaves, and the file id ([`FileId`]) is
//!   `SHA-256("kith file v1\0" ‖ size ‖ chunk_bytes ‖ leaves)` ([`root`]).
//!
//! A fetcher asks a holder for the manifest first, checks it against the id it read in the
//! file message, and then checks every chunk against its leaf the moment it arrives, from
//! whichever member sent it. Holders need no key: they store and serve ciphertext, and
//! only members (who read the file message) can open it.

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::chat::ImageFormat;
use crate::codec::{self, DecodeError, EncodeError};
use crate::envelope::MAX_TEXT_BYTES;
use crate::ids::{FileId, GroupId};

pub mod fetch;

/// Largest file anyone may send (a node's own limit is lower: `[files] max_file_bytes`).
pub const MAX_FILE_BYTES: u64 = 4 << 30;
/// The chunk size senders use.
pub const CHUNK_BYTES: u32 = 256 * 1024;
/// Smallest chunk size a file message may declare.
pub const MIN_CHUNK_BYTES: u32 = 16 * 1024;
/// Largest chunk size a file message may declare (a chunk and its frame fit one decode).
pub const MAX_CHUNK_BYTES: u32 = 512 * 1024;
/// Most chunks of one file: its manifest is at most 512 KiB.
pub const MAX_CHUNKS: u32 = 16 * 1024;
/// Bytes the AEAD adds to every chunk.
pub const TAG_BYTES: u32 = 16;
/// Longest file name, in bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// Longest media type, in bytes.
pub const MAX_MIME_BYTES: usize = 127;
/// Largest thumbnail.
pub const MAX_THUMB_BYTES: usize = 16 * 1024;
/// Longest side of a thumbnail, in pixels.
pub const MAX_THUMB_SIDE: u32 = 320;
/// Longest side of a picture whose dimensions a file message may state.
pub const MAX_IMAGE_SIDE: u32 = 1 << 16;
/// The media type of a file whose type is unknown or malformed.
pub const OCTET_STREAM: &str = "application/octet-stream";
/// The largest [`FileRequest`] on the wire.
pub const MAX_FILE_REQUEST_BYTES: usize = 256;
/// The largest [`FileResponse`] on the wire: a manifest of [`MAX_CHUNKS`] leaves, or a
/// chunk of [`MAX_CHUNK_BYTES`], with room for framing.
pub const MAX_FILE_RESPONSE_BYTES: usize = MAX_CHUNK_BYTES as usize + 4096;

const LEAF_DOMAIN: &[u8] = b"kith file chunk v1\0";
const ROOT_DOMAIN: &[u8] = b"kith file v1\0";
const AAD_DOMAIN: &[u8] = b"kith file v1";

/// A file message: what members need to show, fetch and open a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// The file's id: the root of its manifest ([`root`]).
    pub id: FileId,
    /// The key its chunks are sealed with, fresh for this file.
    pub key: [u8; 32],
    /// Plaintext size in bytes, at most [`MAX_FILE_BYTES`].
    pub size: u64,
    /// Plaintext bytes per chunk ([`MIN_CHUNK_BYTES`] to [`MAX_CHUNK_BYTES`], a power of two).
    pub chunk_bytes: u32,
    /// The name the sender gave it (shown and saved only through [`safe_name`]).
    pub name: String,
    /// Its media type (`type/subtype`), as the sender's node guessed it.
    pub mime: String,
    /// For a picture: its dimensions and a thumbnail.
    pub image: Option<ImageInfo>,
    /// Words sent with it (may be empty), at most [`MAX_TEXT_BYTES`].
    pub caption: String,
}

/// A picture's dimensions and thumbnail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Width in pixels, 1 to [`MAX_IMAGE_SIDE`].
    pub width: u32,
    /// Height in pixels, 1 to [`MAX_IMAGE_SIDE`].
    pub height: u32,
    /// A small version of it.
    pub thumb: Option<Thumbnail>,
}

/// A thumbnail: a small encoded picture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Thumbnail {
    /// Its format (checked against the bytes' signature).
    pub format: ImageFormat,
    /// Width in pixels, 1 to [`MAX_THUMB_SIDE`].
    pub width: u32,
    /// Height in pixels, 1 to [`MAX_THUMB_SIDE`].
    pub height: u32,
    /// The encoded picture, at most [`MAX_THUMB_BYTES`].
    pub bytes: Vec<u8>,
}

/// A file message, a chunk or a fetch message is out of bounds or does not check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    /// A field is out of its bounds.
    #[error("{0}")]
    Bounds(String),
    /// A manifest does not hash to the file's id.
    #[error("the manifest does not match the file id")]
    BadManifest,
    /// A chunk does not hash to its leaf.
    #[error("chunk {0} does not match the manifest")]
    BadChunk(u32),
    /// A chunk does not open with the file's key.
    #[error("chunk {0} does not decrypt")]
    Undecryptable(u32),
}

fn bounds(what: impl Into<String>) -> FileError {
    FileError::Bounds(what.into())
}

/// The layout of a file's chunks: how many, and how long each is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Plaintext size.
    pub size: u64,
    /// Plaintext bytes per chunk.
    pub chunk_bytes: u32,
}

impl Layout {
    /// The layout of a file of `size` bytes in chunks of `chunk_bytes`, if both are in
    /// bounds.
    pub fn new(size: u64, chunk_bytes: u32) -> Result<Layout, FileError> {
        if size > MAX_FILE_BYTES {
            return Err(bounds(format!(
                "a file must be at most {} GiB",
                MAX_FILE_BYTES >> 30
            )));
        }
        if !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&chunk_bytes)
            || !chunk_bytes.is_power_of_two()
        {
            return Err(bounds("chunk size out of bounds"));
        }
        let layout = Layout { size, chunk_bytes };
        if layout.chunks_u64() > u64::from(MAX_CHUNKS) {
            return Err(bounds(format!("a file has at most {MAX_CHUNKS} chunks")));
        }
        Ok(layout)
    }

    fn chunks_u64(&self) -> u64 {
        self.size.div_ceil(u64::from(self.chunk_bytes))
    }

    /// Number of chunks (0 for an empty file).
    pub fn chunks(&self) -> u32 {
        // Bounded by `MAX_CHUNKS` in `new`.
        self.chunks_u64() as u32
    }

    /// Plaintext length of chunk `index` (0 past the end).
    pub fn plain_len(&self, index: u32) -> u32 {
        let start = u64::from(index) * u64::from(self.chunk_bytes);
        self.size
            .saturating_sub(start)
            .min(u64::from(self.chunk_bytes)) as u32
    }

    /// Sealed length of chunk `index`.
    pub fn cipher_len(&self, index: u32) -> u32 {
        self.plain_len(index) + TAG_BYTES
    }

    /// Where chunk `index`'s plaintext starts in the file.
    pub fn offset(&self, index: u32) -> u64 {
        u64::from(index) * u64::from(self.chunk_bytes)
    }

    /// Sealed bytes of the whole file.
    pub fn cipher_size(&self) -> u64 {
        self.size + u64::from(self.chunks()) * u64::from(TAG_BYTES)
    }
}

fn nonce(index: u32) -> Nonce {
    let mut n = [0u8; 12];
    n[8..].copy_from_slice(&index.to_be_bytes());
    Nonce::from(n)
}

fn aad(layout: &Layout, index: u32) -> Vec<u8> {
    let mut a = AAD_DOMAIN.to_vec();
    a.extend(layout.size.to_be_bytes());
    a.extend(layout.chunk_bytes.to_be_bytes());
    a.extend(index.to_be_bytes());
    a
}

/// Seals chunk `index` of a file in place: `buf` holds its plaintext and gets the tag
/// appended. The key must be fresh for the file (the index is the nonce).
pub fn seal_chunk(
    key: &[u8; 32],
    layout: &Layout,
    index: u32,
    buf: &mut Vec<u8>,
) -> Result<(), FileError> {
    if index >= layout.chunks() || buf.len() != layout.plain_len(index) as usize {
        return Err(bounds("chunk index or length out of bounds"));
    }
    let cipher = ChaCha20Poly1305::new(Key::from_slice(key));
    let tag = cipher
        .encrypt_in_place_detached(&nonce(index), &aad(layout, index), buf)
        .map_err(|_| FileError::Undecryptable(index))?;
    buf.extend_from_slice(&tag);
    Ok(())
}

/// Opens sealed chunk `index` in place: `buf` holds it and is left with its plaintext.
pub fn open_chunk(
    key: &[u8; 32],
    layout: &Layout,
    index: u32,
    buf: &mut Vec<u8>,
) -> Result<(), FileError> {
    if index >= layout.chunks() || buf.len() != layout.cipher_len(index) as usize {
        return Err(FileError::Undecryptable(index));
    }
    let split = buf.len() - TAG_BYTES as usize;
    let tag = Tag::clone_from_slice(&buf[split..]);
    buf.truncate(split);
    let cipher = ChaCha20Poly1305::new(Key::from_slice(key));
    cipher
        .decrypt_in_place_detached(&nonce(index), &aad(layout, index), buf, &tag)
        .map_err(|_| FileError::Undecryptable(index))
}

/// The leaf of a sealed chunk.
pub fn leaf(cipher: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(LEAF_DOMAIN);
    h.update(cipher);
    h.finalize().into()
}

/// The file id of a manifest: `SHA-256("kith file v1\0" ‖ size ‖ chunk_bytes ‖ leaves)`,
/// numbers big-endian (8 and 4 bytes).
pub fn root(layout: &Layout, leaves: &[[u8; 32]]) -> FileId {
    let mut h = Sha256::new();
    h.update(ROOT_DOMAIN);
    h.update(layout.size.to_be_bytes());
    h.update(layout.chunk_bytes.to_be_bytes());
    for l in leaves {
        h.update(l);
    }
    FileId(h.finalize().into())
}

/// Checks a manifest received for file `id`: as many leaves as the layout has chunks, and
/// hashing to `id`.
pub fn check_manifest(id: &FileId, layout: &Layout, leaves: &[[u8; 32]]) -> Result<(), FileError> {
    if leaves.len() != layout.chunks() as usize || root(layout, leaves) != *id {
        return Err(FileError::BadManifest);
    }
    Ok(())
}

/// Checks sealed chunk `index` against the manifest: its length and its leaf.
pub fn check_chunk(
    layout: &Layout,
    leaves: &[[u8; 32]],
    index: u32,
    cipher: &[u8],
) -> Result<(), FileError> {
    let expected = leaves
        .get(index as usize)
        .ok_or(FileError::BadChunk(index))?;
    if cipher.len() != layout.cipher_len(index) as usize || leaf(cipher) != *expected {
        return Err(FileError::BadChunk(index));
    }
    Ok(())
}

impl FileRef {
    /// The chunk layout.
    pub fn layout(&self) -> Result<Layout, FileError> {
        Layout::new(self.size, self.chunk_bytes)
    }

    /// Checks every bound: layout, name, type, caption, picture and thumbnail.
    pub fn check(&self) -> Result<(), FileError> {
        self.layout()?;
        if self.name.is_empty() || self.name.len() > MAX_NAME_BYTES {
            return Err(bounds(format!(
                "a file name must be 1 to {MAX_NAME_BYTES} bytes"
            )));
        }
        if self.mime.len() > MAX_MIME_BYTES {
            return Err(bounds("media type too long"));
        }
        if self.caption.len() > MAX_TEXT_BYTES {
            return Err(bounds(format!(
                "a caption must be at most {MAX_TEXT_BYTES} bytes"
            )));
        }
        if let Some(img) = &self.image {
            let side = 1..=MAX_IMAGE_SIDE;
            if !side.contains(&img.width) || !side.contains(&img.height) {
                return Err(bounds("picture dimensions out of bounds"));
            }
            if let Some(t) = &img.thumb {
                t.check()?;
            }
        }
        Ok(())
    }

    /// The name to show and save it under ([`safe_name`]).
    pub fn display_name(&self) -> String {
        safe_name(&self.name)
    }

    /// The media type to use for it ([`clean_mime`]).
    pub fn media_type(&self) -> &str {
        clean_mime(&self.mime)
    }
}

impl Thumbnail {
    /// Checks its bounds: size, dimensions, and that the bytes are the format it claims.
    /// Decoding it within these bounds is the viewer's part (the node checks it with a
    /// bounded decoder before showing it).
    pub fn check(&self) -> Result<(), FileError> {
        if self.bytes.is_empty() || self.bytes.len() > MAX_THUMB_BYTES {
            return Err(bounds(format!(
                "a thumbnail must be at most {} KiB",
                MAX_THUMB_BYTES / 1024
            )));
        }
        let side = 1..=MAX_THUMB_SIDE;
        if !side.contains(&self.width) || !side.contains(&self.height) {
            return Err(bounds("thumbnail dimensions out of bounds"));
        }
        if ImageFormat::sniff(&self.bytes) != Some(self.format) {
            return Err(bounds("the thumbnail is not the format it claims"));
        }
        Ok(())
    }
}

/// A file name made safe to show and to save in a directory: only its last path
/// component (after `/` or `\`), without control or invisible formatting characters,
/// without leading dots or trailing dots and spaces, not a name Windows reserves, at most
/// [`MAX_NAME_BYTES`] bytes (cut at a character boundary, keeping the extension where it
/// fits). `file` if nothing is left.
pub fn safe_name(name: &str) -> String {
    let last = name.rsplit(['/', '\\']).next().unwrap_or("");
    let mut out: String = last
        .chars()
        .filter(|c| !c.is_control() && !crate::chat::is_format_control(*c))
        .map(|c| match c {
            ':' | '*' | '?' | '"' | '<' | '>' | '|' => '_',
            c => c,
        })
        .collect();
    let trimmed = out
        .trim_start_matches(['.', ' '])
        .trim_end_matches(['.', ' ']);
    out = trimmed.to_owned();
    if out.is_empty() {
        return "file".to_owned();
    }
    let stem = out.split('.').next().unwrap_or("").to_ascii_uppercase();
    const RESERVED: [&str; 6] = ["CON", "PRN", "AUX", "NUL", "COM", "LPT"];
    let reserved = RESERVED.contains(&stem.as_str())
        || (stem.len() == 4
            && (stem.starts_with("COM") || stem.starts_with("LPT"))
            && stem.as_bytes()[3].is_ascii_digit());
    if reserved {
        out.insert(0, '_');
    }
    if out.len() > MAX_NAME_BYTES {
        let ext = out
            .rfind('.')
            .map(|i| out[i..].to_owned())
            .filter(|e| e.len() <= 16)
            .unwrap_or_default();
        let mut cut = MAX_NAME_BYTES - ext.len();
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str(&ext);
    }
    out
}

/// `mime` if it is a well-formed `type/subtype` of lowercase letters, digits and `.+-`
/// (at most [`MAX_MIME_BYTES`]), else [`OCTET_STREAM`].
pub fn clean_mime(mime: &str) -> &str {
    let ok_part = |p: &str| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-+.".contains(&b))
    };
    match mime.split_once('/') {
        Some((t, s)) if mime.len() <= MAX_MIME_BYTES && ok_part(t) && ok_part(s) => mime,
        _ => OCTET_STREAM,
    }
}

/// Which chunks of a file a node holds: one bit per chunk, lowest index in the lowest bit
/// of the first byte.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bitmap {
    bits: u32,
    bytes: Vec<u8>,
}

impl Bitmap {
    /// No chunk of `bits`.
    pub fn empty(bits: u32) -> Bitmap {
        Bitmap {
            bits,
            bytes: vec![0; bits.div_ceil(8) as usize],
        }
    }

    /// Every chunk of `bits`.
    pub fn full(bits: u32) -> Bitmap {
        let mut b = Bitmap::empty(bits);
        for i in 0..bits {
            b.set(i);
        }
        b
    }

    /// A bitmap of `bits` from its bytes, if they are that long with no bit set past the end.
    pub fn from_bytes(bits: u32, bytes: Vec<u8>) -> Option<Bitmap> {
        let b = Bitmap { bits, bytes };
        let tail_clear = (bits..b.bytes.len() as u32 * 8).all(|i| !b.raw(i));
        (b.bytes.len() == bits.div_ceil(8) as usize && tail_clear).then_some(b)
    }

    fn raw(&self, i: u32) -> bool {
        self.bytes
            .get((i / 8) as usize)
            .is_some_and(|b| b & (1 << (i % 8)) != 0)
    }

    /// Its bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Number of chunks it covers.
    pub fn len(&self) -> u32 {
        self.bits
    }

    /// Whether it covers no chunk.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// Whether chunk `i` is held.
    pub fn get(&self, i: u32) -> bool {
        i < self.bits && self.raw(i)
    }

    /// Marks chunk `i` held (ignored past the end).
    pub fn set(&mut self, i: u32) {
        if i < self.bits {
            self.bytes[(i / 8) as usize] |= 1 << (i % 8);
        }
    }

    /// Chunks held.
    pub fn count(&self) -> u32 {
        self.bytes.iter().map(|b| b.count_ones()).sum()
    }

    /// Whether every chunk is held.
    pub fn is_full(&self) -> bool {
        self.count() == self.bits
    }
}

/// A request of the file protocol (versioned).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileRequest {
    /// Version 1.
    V1(FileRequestV1),
}

/// Version 1 of [`FileRequest`]: something of `file`, posted in `group`. A holder answers
/// only members of a group it knows the file from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRequestV1 {
    /// The group the file was posted in.
    pub group: GroupId,
    /// The file.
    pub file: FileId,
    /// What of it.
    pub want: FileWant,
}

/// What a [`FileRequest`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileWant {
    /// Which chunks the holder has.
    Have,
    /// The manifest.
    Manifest,
    /// One sealed chunk.
    Chunk(u32),
}

/// An answer of the file protocol (versioned).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileResponse {
    /// Version 1.
    V1(FileResponseV1),
}

/// Version 1 of [`FileResponse`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileResponseV1 {
    /// The chunks the holder has ([`Bitmap`] bytes, one bit per chunk).
    Have(Vec<u8>),
    /// The manifest: every chunk's leaf.
    Manifest(Vec<[u8; 32]>),
    /// A sealed chunk.
    Chunk(Vec<u8>),
    /// The holder does not have it (any more), or not that part.
    NotHere,
    /// The holder does not serve the requester this file (not a member of the group, or the
    /// group does not have the file).
    Denied,
    /// The holder is busy (rate limit or too many requests at once); ask later.
    Busy,
}

impl FileRequest {
    /// Encodes it.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        codec::encode(self)
    }

    /// Decodes a request from the network.
    pub fn decode(bytes: &[u8]) -> Result<FileRequest, DecodeError> {
        codec::decode(bytes, MAX_FILE_REQUEST_BYTES)
    }

    /// Its version 1 content.
    pub fn v1(&self) -> &FileRequestV1 {
        match self {
            FileRequest::V1(r) => r,
        }
    }
}

impl FileResponse {
    /// Encodes it.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        codec::encode(self)
    }

    /// Decodes an answer from the network, bound-checked: a manifest of at most
    /// [`MAX_CHUNKS`] leaves, a chunk of at most [`MAX_CHUNK_BYTES`] + tag, a bitmap of at
    /// most [`MAX_CHUNKS`] bits.
    pub fn decode(bytes: &[u8]) -> Result<FileResponse, DecodeError> {
        let r: FileResponse = codec::decode(bytes, MAX_FILE_RESPONSE_BYTES)?;
        let FileResponse::V1(v) = &r;
        let ok = match v {
            FileResponseV1::Have(b) => b.len() <= (MAX_CHUNKS / 8) as usize,
            FileResponseV1::Manifest(l) => l.len() <= MAX_CHUNKS as usize,
            FileResponseV1::Chunk(c) => c.len() <= (MAX_CHUNK_BYTES + TAG_BYTES) as usize,
            _ => true,
        };
        if !ok {
            return Err(DecodeError::Malformed("file response out of bounds".into()));
        }
        Ok(r)
    }

    /// Its version 1 content.
    pub fn into_v1(self) -> FileResponseV1 {
        match self {
            FileResponse::V1(r) => r,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sealed_file(data: &[u8], chunk: u32, key: &[u8; 32]) -> (Layout, Vec<Vec<u8>>, FileId) {
        let layout = Layout::new(data.len() as u64, chunk).unwrap();
        let mut chunks = Vec::new();
        for i in 0..layout.chunks() {
            let start = layout.offset(i) as usize;
            let mut buf = data[start..start + layout.plain_len(i) as usize].to_vec();
            seal_chunk(key, &layout, i, &mut buf).unwrap();
            chunks.push(buf);
        }
        let leaves: Vec<_> = chunks.iter().map(|c| leaf(c)).collect();
        let id = root(&layout, &leaves);
        (layout, chunks, id)
    }

    #[test]
    fn chunks_seal_check_and_open() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let key = [7; 32];
        let (layout, chunks, id) = sealed_file(&data, MIN_CHUNK_BYTES, &key);
        assert_eq!(layout.chunks(), 7);
        assert_eq!(layout.plain_len(6), 100_000 - 6 * 16384);
        let leaves: Vec<_> = chunks.iter().map(|c| leaf(c)).collect();
        check_manifest(&id, &layout, &leaves).unwrap();
        let mut out = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            check_chunk(&layout, &leaves, i as u32, c).unwrap();
            let mut buf = c.clone();
            open_chunk(&key, &layout, i as u32, &mut buf).unwrap();
            out.extend(buf);
        }
        assert_eq!(out, data);
        // A flipped bit, a chunk in another place, a truncated manifest: all caught.
        let mut bad = chunks[2].clone();
        bad[5] ^= 1;
        assert_eq!(
            check_chunk(&layout, &leaves, 2, &bad),
            Err(FileError::BadChunk(2))
        );
        assert!(check_chunk(&layout, &leaves, 3, &chunks[2]).is_err());
        assert!(check_manifest(&id, &layout, &leaves[..6]).is_err());
        let mut swapped = leaves.clone();
        swapped.swap(0, 1);
        assert_eq!(
            check_manifest(&id, &layout, &swapped),
            Err(FileError::BadManifest)
        );
        // The same chunk under another index or another key does not open.
        let mut moved = chunks[1].clone();
        assert!(open_chunk(&key, &layout, 2, &mut moved).is_err());
        let mut wrong_key = chunks[1].clone();
        assert!(open_chunk(&[8; 32], &layout, 1, &mut wrong_key).is_err());
    }

    #[test]
    fn layouts_are_bounded() {
        assert!(Layout::new(MAX_FILE_BYTES, CHUNK_BYTES).is_ok());
        assert!(Layout::new(MAX_FILE_BYTES + 1, CHUNK_BYTES).is_err());
        assert!(Layout::new(MAX_FILE_BYTES, MIN_CHUNK_BYTES).is_err());
        assert!(Layout::new(10, 3000).is_err());
        assert!(Layout::new(10, MAX_CHUNK_BYTES * 2).is_err());
        let empty = Layout::new(0, CHUNK_BYTES).unwrap();
        assert_eq!(empty.chunks(), 0);
        assert_eq!(empty.cipher_size(), 0);
        let exact = Layout::new(u64::from(CHUNK_BYTES) * 2, CHUNK_BYTES).unwrap();
        assert_eq!(exact.chunks(), 2);
        assert_eq!(exact.plain_len(1), CHUNK_BYTES);
        assert_eq!(exact.plain_len(2), 0);
    }

    #[test]
    fn names_cannot_leave_the_directory_or_hide_what_they_are() {
        assert_eq!(safe_name("../../etc/passwd"), "passwd");
        assert_eq!(safe_name("..\\..\\Windows\\evil.dll"), "evil.dll");
        assert_eq!(safe_name("/abs/path/x.txt"), "x.txt");
        assert_eq!(safe_name(".."), "file");
        assert_eq!(safe_name("a/"), "file");
        assert_eq!(safe_name(".bashrc"), "bashrc");
        assert_eq!(safe_name("photo\u{202E}gpj.exe"), "photogpj.exe");
        assert_eq!(safe_name("a\u{0000}b\nc.txt"), "abc.txt");
        assert_eq!(safe_name("CON.txt"), "_CON.txt");
        assert_eq!(safe_name("com1"), "_com1");
        assert_eq!(safe_name("what?.txt "), "what_.txt");
        let long = format!("{}.jpeg", "é".repeat(300));
        let cut = safe_name(&long);
        assert!(
            cut.len() <= MAX_NAME_BYTES && cut.ends_with(".jpeg"),
            "{cut}"
        );
    }

    #[test]
    fn media_types_are_checked() {
        assert_eq!(clean_mime("image/png"), "image/png");
        assert_eq!(
            clean_mime("application/vnd.ms-excel"),
            "application/vnd.ms-excel"
        );
        assert_eq!(clean_mime("text/html; charset=x"), OCTET_STREAM);
        assert_eq!(clean_mime("Image/PNG"), OCTET_STREAM);
        assert_eq!(clean_mime("nope"), OCTET_STREAM);
        assert_eq!(clean_mime(""), OCTET_STREAM);
    }

    #[test]
    fn bitmaps_count_and_refuse_stray_bits() {
        let mut b = Bitmap::empty(10);
        assert_eq!(b.as_bytes().len(), 2);
        b.set(0);
        b.set(9);
        b.set(10);
        assert_eq!(b.count(), 2);
        assert!(b.get(9) && !b.get(10));
        assert!(Bitmap::full(10).is_full());
        assert!(Bitmap::from_bytes(10, vec![0xff, 0x03]).is_some());
        assert!(Bitmap::from_bytes(10, vec![0xff, 0x07]).is_none());
        assert!(Bitmap::from_bytes(10, vec![0xff]).is_none());
    }

    #[test]
    fn file_messages_are_bounded() {
        let ok = FileRef {
            id: FileId([1; 32]),
            key: [2; 32],
            size: 1000,
            chunk_bytes: CHUNK_BYTES,
            name: "a.png".into(),
            mime: "image/png".into(),
            image: Some(ImageInfo {
                width: 640,
                height: 480,
                thumb: Some(Thumbnail {
                    format: ImageFormat::Png,
                    width: 64,
                    height: 48,
                    bytes: b"\x89PNG\r\n\x1a\n....".to_vec(),
                }),
            }),
            caption: String::new(),
        };
        ok.check().unwrap();
        let with = |f: fn(&mut FileRef)| {
            let mut r = ok.clone();
            f(&mut r);
            r.check()
        };
        assert!(with(|r| r.name = String::new()).is_err());
        assert!(with(|r| r.name = "x".repeat(MAX_NAME_BYTES + 1)).is_err());
        assert!(with(|r| r.size = MAX_FILE_BYTES + 1).is_err());
        assert!(with(|r| r.chunk_bytes = 1000).is_err());
        assert!(with(|r| r.caption = "x".repeat(MAX_TEXT_BYTES + 1)).is_err());
        assert!(with(|r| r.image.as_mut().unwrap().width = 0).is_err());
        assert!(
            with(|r| r.image.as_mut().unwrap().thumb.as_mut().unwrap().format = ImageFormat::Jpeg)
                .is_err()
        );
        assert!(
            with(|r| r.image.as_mut().unwrap().thumb.as_mut().unwrap().width = MAX_THUMB_SIDE + 1)
                .is_err()
        );
        assert!(
            with(|r| r
                .image
                .as_mut()
                .unwrap()
                .thumb
                .as_mut()
                .unwrap()
                .bytes
                .resize(MAX_THUMB_BYTES + 1, 0))
            .is_err()
        );
    }

    #[test]
    fn responses_over_their_bounds_are_refused() {
        let big = FileResponse::V1(FileResponseV1::Manifest(vec![
            [0; 32];
            MAX_CHUNKS as usize + 1
        ]));
        let bytes = big.encode().unwrap();
        assert!(FileResponse::decode(&bytes).is_err());
        let chunk = FileResponse::V1(FileResponseV1::Chunk(vec![
            1;
            (MAX_CHUNK_BYTES + TAG_BYTES)
                as usize
        ]));
        let bytes = chunk.encode().unwrap();
        assert_eq!(FileResponse::decode(&bytes).unwrap(), chunk);
        let over = FileResponse::V1(FileResponseV1::Chunk(vec![
            1;
            (MAX_CHUNK_BYTES + TAG_BYTES + 1)
                as usize
        ]));
        assert!(FileResponse::decode(&over.encode().unwrap()).is_err());
    }
}
