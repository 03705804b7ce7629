//! Media types, picture dimensions and thumbnails of files this node sends, and the bounded check of thumbnails it receives.
//!
//! Everything here reads bytes that may be hostile (a file the user picked, a thumbnail from
//! the network) and stays within bounds on any of them: headers (PNG, JPEG, WebP, GIF) are
//! read by hand before any decoder runs, a picture is decoded only when its header promises
//! a bounded amount of memory, decoders run with `image`'s [`Limits`], and a decoder's panic is turned into an
//! error. Decoding a large picture takes a while: call [`picture`] off the async runtime
//! (`spawn_blocking`).

use std::fs::File;
use std::io::{self, BufRead, BufReader, Cursor, Read, Seek};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use image::codecs::gif::GifDecoder;
use image::codecs::jpeg::{JpegDecoder, JpegEncoder};
use image::codecs::png::{CompressionType, FilterType, PngDecoder, PngEncoder};
use image::codecs::webp::WebPDecoder;
use image::metadata::Orientation;
use image::{
    DynamicImage, ExtendedColorType, GenericImageView, ImageDecoder, ImageEncoder,
    ImageFormat as Codec, Limits, RgbImage, RgbaImage,
};
use kith_protocol::chat::ImageFormat;
use kith_protocol::files::{
    FileError, ImageInfo, MAX_IMAGE_SIDE, MAX_THUMB_BYTES, MAX_THUMB_SIDE, OCTET_STREAM, Thumbnail,
};

/// Longest side of the thumbnails this node makes, in pixels (at most [`MAX_THUMB_SIDE`]).
pub const THUMB_SIDE: u32 = 160;
/// Most pixels of a picture this node decodes to make a thumbnail of.
pub const MAX_PICTURE_PIXELS: u64 = 40_000_000;
/// Largest picture file this node decodes to make a thumbnail of.
pub const MAX_PICTURE_BYTES: u64 = 64 << 20;
/// Largest decoded picture (40 Mpx of 8-bit RGBA fits; 16-bit RGBA of that size does not).
const MAX_DECODED_BYTES: u64 = 256 << 20;
/// Largest decoded thumbnail: [`MAX_THUMB_SIDE`]² pixels of 16-bit RGBA.
const MAX_THUMB_DECODED_BYTES: u64 = (MAX_THUMB_SIDE as u64) * (MAX_THUMB_SIDE as u64) * 8;
/// The JPEG qualities tried in turn until a thumbnail fits [`MAX_THUMB_BYTES`].
const JPEG_QUALITIES: [u8; 7] = [80, 70, 60, 50, 40, 30, 20];
/// Most bytes read past a JPEG's start looking for its frame header (EXIF, ICC profiles and
/// other metadata segments come first).
const MAX_JPEG_HEADER_BYTES: u64 = 4 << 20;

/// A picture could not be read, decoded or thumbnailed, or a thumbnail does not check.
#[derive(Debug, thiserror::Error)]
pub enum ThumbError {
    /// Reading the file failed.
    #[error("reading the picture: {0}")]
    Io(#[from] io::Error),
    /// A thumbnail is out of the protocol's bounds.
    #[error(transparent)]
    Bounds(#[from] FileError),
    /// The bytes have no readable header of the format they should be in.
    #[error("not a picture this node can read")]
    NotAPicture,
    /// The header's dimensions are not the ones claimed (or the decoder's).
    #[error("the picture is {}×{}, not {}×{}", .header.0, .header.1, .claimed.0, .claimed.1)]
    Dimensions {
        /// What the header says.
        header: (u32, u32),
        /// What was claimed.
        claimed: (u32, u32),
    },
    /// The picture is beyond the decoding bounds.
    #[error("the picture is too large to decode")]
    TooLarge,
    /// The decoder refused the bytes.
    #[error("decoding the picture: {0}")]
    Decode(#[from] image::ImageError),
    /// The decoder panicked on the bytes (caught).
    #[error("the decoder failed on the picture")]
    DecoderPanicked,
    /// No encoding of the thumbnail fits [`MAX_THUMB_BYTES`].
    #[error("no thumbnail encoding fits {MAX_THUMB_BYTES} bytes")]
    NoFit,
}

// ---------------------------------------------------------------------------------------
// Media types
// ---------------------------------------------------------------------------------------

/// Media types of common extensions (lowercase, without the dot).
const EXTENSIONS: &[(&str, &str)] = &[
    ("txt", "text/plain"),
    ("log", "text/plain"),
    ("md", "text/markdown"),
    ("csv", "text/csv"),
    ("tsv", "text/tab-separated-values"),
    ("html", "text/html"),
    ("htm", "text/html"),
    ("css", "text/css"),
    ("js", "text/javascript"),
    ("ics", "text/calendar"),
    ("vcf", "text/vcard"),
    ("json", "application/json"),
    ("xml", "application/xml"),
    ("svg", "image/svg+xml"),
    ("png", "image/png"),
    ("jpg", "image/jpeg"),
    ("jpeg", "image/jpeg"),
    ("gif", "image/gif"),
    ("webp", "image/webp"),
    ("bmp", "image/bmp"),
    ("tif", "image/tiff"),
    ("tiff", "image/tiff"),
    ("heic", "image/heic"),
    ("avif", "image/avif"),
    ("ico", "image/x-icon"),
    ("pdf", "application/pdf"),
    ("rtf", "application/rtf"),
    ("zip", "application/zip"),
    ("gz", "application/gzip"),
    ("tar", "application/x-tar"),
    ("7z", "application/x-7z-compressed"),
    ("rar", "application/vnd.rar"),
    ("mp3", "audio/mpeg"),
    ("m4a", "audio/mp4"),
    ("wav", "audio/wav"),
    ("ogg", "audio/ogg"),
    ("opus", "audio/ogg"),
    ("flac", "audio/flac"),
    ("mp4", "video/mp4"),
    ("m4v", "video/mp4"),
    ("mov", "video/quicktime"),
    ("webm", "video/webm"),
    ("mkv", "video/x-matroska"),
    ("avi", "video/x-msvideo"),
    ("doc", "application/msword"),
    ("xls", "application/vnd.ms-excel"),
    ("ppt", "application/vnd.ms-powerpoint"),
    (
        "docx",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    ),
    (
        "xlsx",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    ),
    (
        "pptx",
        "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    ),
    ("odt", "application/vnd.oasis.opendocument.text"),
    ("ods", "application/vnd.oasis.opendocument.spreadsheet"),
    ("odp", "application/vnd.oasis.opendocument.presentation"),
    ("epub", "application/epub+zip"),
    ("jar", "application/java-archive"),
    ("apk", "application/vnd.android.package-archive"),
];

/// Extensions whose files are ZIP archives: a ZIP signature keeps their more precise type.
const ZIP_BASED: &[&str] = &[
    "docx", "xlsx", "pptx", "odt", "ods", "odp", "epub", "jar", "apk",
];

/// Types that hold text: plain UTF-8 content keeps them rather than `text/plain`.
fn is_textual(mime: &str) -> bool {
    mime.starts_with("text/")
        || matches!(
            mime,
            "application/json" | "application/xml" | "image/svg+xml"
        )
}

/// The media type of a file from its first bytes `head` (a few hundred bytes are enough)
/// and its `name`: its signature first (PNG, JPEG, GIF, WebP, TIFF, PDF, ZIP, gzip, 7z,
/// RAR, MP4/MOV/HEIC/AVIF, WebM/Matroska, Ogg, MP3 with ID3, FLAC, WAV, AVI), then plain
/// UTF-8 text, then the name's extension, else `application/octet-stream`. The result is
/// always a well-formed type (`kith_protocol::files::clean_mime` keeps it).
pub fn media_type(head: &[u8], name: &str) -> String {
    let ext = extension(name);
    let by_ext = ext.as_deref().and_then(|e| {
        EXTENSIONS
            .iter()
            .find(|(x, _)| *x == e)
            .map(|(_, mime)| *mime)
    });
    let zip_based = ext.as_deref().is_some_and(|e| ZIP_BASED.contains(&e));
    sniff(head, by_ext, zip_based)
        .or(by_ext)
        .unwrap_or(OCTET_STREAM)
        .to_owned()
}

/// The lowercase extension of the last component of `name`, if it is 1 to 8 ASCII letters
/// and digits.
fn extension(name: &str) -> Option<String> {
    let last = name.rsplit(['/', '\\']).next()?;
    let (_, ext) = last.rsplit_once('.')?;
    let ok = (1..=8).contains(&ext.len()) && ext.bytes().all(|b| b.is_ascii_alphanumeric());
    ok.then(|| ext.to_ascii_lowercase())
}

fn sniff(head: &[u8], by_ext: Option<&'static str>, zip_based: bool) -> Option<&'static str> {
    let at = |offset: usize, sig: &[u8]| head.get(offset..offset + sig.len()) == Some(sig);
    let early = &head[..head.len().min(64)];
    let mime = if at(0, b"\x89PNG\r\n\x1a\n") {
        "image/png"
    } else if at(0, &[0xFF, 0xD8, 0xFF]) {
        "image/jpeg"
    } else if at(0, b"GIF87a") || at(0, b"GIF89a") {
        "image/gif"
    } else if at(0, b"RIFF") && at(8, b"WEBP") {
        "image/webp"
    } else if at(0, b"RIFF") && at(8, b"WAVE") {
        "audio/wav"
    } else if at(0, b"RIFF") && at(8, b"AVI ") {
        "video/x-msvideo"
    } else if at(0, b"II*\0") || at(0, b"MM\0*") {
        "image/tiff"
    } else if at(0, b"%PDF-") {
        "application/pdf"
    } else if at(0, b"PK\x03\x04") || at(0, b"PK\x05\x06") {
        match by_ext {
            Some(t) if zip_based => t,
            _ => "application/zip",
        }
    } else if at(0, &[0x1F, 0x8B]) {
        "application/gzip"
    } else if at(0, b"7z\xBC\xAF\x27\x1C") {
        "application/x-7z-compressed"
    } else if at(0, b"Rar!\x1A\x07") {
        "application/vnd.rar"
    } else if at(4, b"ftyp") {
        match head.get(8..12) {
            Some(b"qt  ") => "video/quicktime",
            Some(b"M4A " | b"M4B ") => "audio/mp4",
            Some(b"heic" | b"heix" | b"heim" | b"heis" | b"mif1" | b"msf1") => "image/heic",
            Some(b"avif" | b"avis") => "image/avif",
            Some(brand) if brand.starts_with(b"3g") => "video/3gpp",
            _ => "video/mp4",
        }
    } else if at(0, &[0x1A, 0x45, 0xDF, 0xA3]) {
        if contains(early, b"webm") {
            "video/webm"
        } else {
            "video/x-matroska"
        }
    } else if at(0, b"OggS") {
        if contains(early, b"theora") {
            "video/ogg"
        } else {
            "audio/ogg"
        }
    } else if at(0, b"ID3") {
        "audio/mpeg"
    } else if at(0, b"fLaC") {
        "audio/flac"
    } else if is_text(head) {
        by_ext.filter(|t| is_textual(t)).unwrap_or("text/plain")
    } else {
        return None;
    };
    Some(mime)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Whether `head` looks like the start of a UTF-8 text: valid UTF-8 (a character cut at the
/// end is fine), no NUL and no control characters but tab, line breaks, form feed and escape.
fn is_text(head: &[u8]) -> bool {
    let utf8 = match std::str::from_utf8(head) {
        Ok(_) => true,
        Err(e) => e.error_len().is_none(),
    };
    !head.is_empty()
        && utf8
        && head
            .iter()
            .all(|&b| b >= 0x20 || matches!(b, b'\t' | b'\n' | b'\r' | 0x0C | 0x1B))
}

// ---------------------------------------------------------------------------------------
// Headers
// ---------------------------------------------------------------------------------------

/// What a picture's header says, read without a decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    format: Codec,
    /// As stored (before any EXIF orientation).
    width: u32,
    height: u32,
    orientation: Orientation,
}

impl Header {
    /// The dimensions as shown, after the EXIF orientation.
    fn shown(&self) -> (u32, u32) {
        match self.orientation {
            Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH => (self.height, self.width),
            _ => (self.width, self.height),
        }
    }
}

/// `Ok(None)` for a read that ran out of bytes (a truncated header).
fn eof_is_none<T>(r: io::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

fn read_array<const N: usize>(r: &mut impl Read) -> io::Result<[u8; N]> {
    let mut buf = [0; N];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    read_array(r).map(u16::from_be_bytes)
}

/// The header of the PNG, JPEG, WebP or GIF picture `r` starts with, `None` if it is none
/// of them or its header is truncated or malformed. Reads at most [`MAX_JPEG_HEADER_BYTES`]
/// and allocates at most one 64 KiB segment.
fn read_header(r: &mut impl Read) -> io::Result<Option<Header>> {
    let magic: [u8; 3] = match eof_is_none(read_array(r))? {
        Some(m) => m,
        None => return Ok(None),
    };
    let header = match &magic {
        b"\x89PN" => png_header(r),
        [0xFF, 0xD8, 0xFF] => jpeg_header(&mut r.by_ref().take(MAX_JPEG_HEADER_BYTES)),
        b"RIF" => webp_header(r),
        b"GIF" => gif_header(r),
        _ => return Ok(None),
    };
    Ok(eof_is_none(header)?.flatten())
}

/// A header of stored dimensions, if neither is zero.
fn stored(format: Codec, width: u32, height: u32) -> Option<Header> {
    (width > 0 && height > 0).then_some(Header {
        format,
        width,
        height,
        orientation: Orientation::NoTransforms,
    })
}

/// The rest of a PNG signature and its first chunk, which must be `IHDR`.
fn png_header(r: &mut impl Read) -> io::Result<Option<Header>> {
    let rest: [u8; 21] = read_array(r)?;
    let (sig, chunk) = rest.split_at(5);
    if sig != b"G\r\n\x1a\n" || chunk[..8] != *b"\0\0\0\x0dIHDR" {
        return Ok(None);
    }
    let width = u32::from_be_bytes([chunk[8], chunk[9], chunk[10], chunk[11]]);
    let height = u32::from_be_bytes([chunk[12], chunk[13], chunk[14], chunk[15]]);
    Ok(stored(Codec::Png, width, height))
}

/// The rest of a WebP's RIFF header and its first chunk: a lossy frame (`VP8 `), a lossless
/// one (`VP8L`) or the extended header's canvas (`VP8X`).
fn webp_header(r: &mut impl Read) -> io::Result<Option<Header>> {
    let rest: [u8; 27] = read_array(r)?;
    if rest[0] != b'F' || rest[5..9] != *b"WEBP" {
        return Ok(None);
    }
    let (kind, body) = (&rest[9..13], &rest[17..]);
    let le16 = |i: usize| u32::from(u16::from_le_bytes([body[i], body[i + 1]]));
    let le24 = |i: usize| u32::from_le_bytes([body[i], body[i + 1], body[i + 2], 0]);
    let (width, height) = match kind {
        b"VP8 " if body[3..6] == [0x9D, 0x01, 0x2A] => (le16(6) & 0x3FFF, le16(8) & 0x3FFF),
        b"VP8L" if body[0] == 0x2F => {
            let bits = u32::from_le_bytes([body[1], body[2], body[3], body[4]]);
            ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        }
        b"VP8X" => (le24(4) + 1, le24(7) + 1),
        _ => return Ok(None),
    };
    Ok(stored(Codec::WebP, width, height))
}

/// The rest of a GIF's signature and its logical screen.
fn gif_header(r: &mut impl Read) -> io::Result<Option<Header>> {
    let rest: [u8; 7] = read_array(r)?;
    if !matches!(&rest[..3], b"87a" | b"89a") {
        return Ok(None);
    }
    let width = u32::from(u16::from_le_bytes([rest[3], rest[4]]));
    let height = u32::from(u16::from_le_bytes([rest[5], rest[6]]));
    Ok(stored(Codec::Gif, width, height))
}

/// The segments of a JPEG after its `FF D8 FF`, up to its frame header (`SOFn`), noting the
/// EXIF orientation on the way.
fn jpeg_header(r: &mut impl Read) -> io::Result<Option<Header>> {
    let mut orientation = Orientation::NoTransforms;
    // The first marker's 0xFF is already read.
    let mut marker = [0xFF];
    loop {
        if marker[0] != 0xFF {
            return Ok(None);
        }
        // Fill bytes (0xFF) may precede a marker.
        let mut code = read_array::<1>(r)?[0];
        while code == 0xFF {
            code = read_array::<1>(r)?[0];
        }
        match code {
            // Standalone markers: no length.
            0x01 | 0xD0..=0xD8 => {}
            // The scan or the end before any frame header.
            0xD9 | 0xDA | 0x00 => return Ok(None),
            // Frame headers (all but DHT, JPG and DAC in C0..CF).
            0xC0..=0xCF if !matches!(code, 0xC4 | 0xC8 | 0xCC) => {
                let len = read_u16(r)?;
                let frame: [u8; 5] = read_array(r)?;
                let height = u32::from(u16::from_be_bytes([frame[1], frame[2]]));
                let width = u32::from(u16::from_be_bytes([frame[3], frame[4]]));
                // A zero height is declared later (DNL): not something to trust.
                let header = stored(Codec::Jpeg, width, height);
                return Ok(header
                    .filter(|_| len >= 8)
                    .map(|h| Header { orientation, ..h }));
            }
            _ => {
                let len = read_u16(r)?;
                let Some(body) = len.checked_sub(2).map(u64::from) else {
                    return Ok(None);
                };
                if code == 0xE1 && orientation == Orientation::NoTransforms {
                    let mut seg = Vec::new();
                    r.by_ref().take(body).read_to_end(&mut seg)?;
                    if let Some(tiff) = seg.strip_prefix(b"Exif\0\0") {
                        orientation =
                            Orientation::from_exif_chunk(tiff).unwrap_or(Orientation::NoTransforms);
                    }
                    if seg.len() as u64 != body {
                        return Ok(None);
                    }
                } else if io::copy(&mut r.by_ref().take(body), &mut io::sink())? != body {
                    return Ok(None);
                }
            }
        }
        marker = read_array(r)?;
    }
}

// ---------------------------------------------------------------------------------------
// Decoding and thumbnails
// ---------------------------------------------------------------------------------------

/// Runs a decoder, turning a panic in it into an error.
fn guarded<T>(f: impl FnOnce() -> Result<T, ThumbError>) -> Result<T, ThumbError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(Err(ThumbError::DecoderPanicked))
}

fn limits(max_side: u32, max_alloc: u64) -> Limits {
    let mut limits = Limits::default();
    limits.max_image_width = Some(max_side);
    limits.max_image_height = Some(max_side);
    limits.max_alloc = Some(max_alloc);
    limits
}

/// Decodes `r` as `format` (PNG, JPEG, WebP or GIF; a GIF's first frame) within `limits`, if the decoder agrees the picture is `expect`
/// (width, height) and decodes to at most `max_bytes`.
fn decode<R: BufRead + Seek>(
    r: R,
    format: Codec,
    limits: Limits,
    expect: (u32, u32),
    max_bytes: u64,
) -> Result<DynamicImage, ThumbError> {
    fn finish(
        decoder: impl ImageDecoder,
        expect: (u32, u32),
        max_bytes: u64,
    ) -> Result<DynamicImage, ThumbError> {
        if decoder.dimensions() != expect {
            return Err(ThumbError::Dimensions {
                header: decoder.dimensions(),
                claimed: expect,
            });
        }
        if decoder.total_bytes() > max_bytes {
            return Err(ThumbError::TooLarge);
        }
        Ok(DynamicImage::from_decoder(decoder)?)
    }
    fn limited(
        mut decoder: impl ImageDecoder,
        limits: Limits,
        expect: (u32, u32),
        max_bytes: u64,
    ) -> Result<DynamicImage, ThumbError> {
        decoder.set_limits(limits)?;
        finish(decoder, expect, max_bytes)
    }
    guarded(|| match format {
        Codec::Png => finish(PngDecoder::with_limits(r, limits)?, expect, max_bytes),
        Codec::Jpeg => limited(JpegDecoder::new(r)?, limits, expect, max_bytes),
        Codec::WebP => limited(WebPDecoder::new(r)?, limits, expect, max_bytes),
        Codec::Gif => limited(GifDecoder::new(r)?, limits, expect, max_bytes),
        _ => Err(ThumbError::NotAPicture),
    })
}

/// The dimensions of a `width`×`height` picture scaled down to fit `side`×`side`, keeping its
/// aspect ratio (never scaled up, never below 1 pixel).
fn fit(width: u32, height: u32, side: u32) -> (u32, u32) {
    let long = width.max(height);
    if long <= side {
        return (width, height);
    }
    let scale = |v: u32| {
        let scaled = (u64::from(v) * u64::from(side) + u64::from(long) / 2) / u64::from(long);
        // At most `side`, as v <= long.
        u32::try_from(scaled).unwrap_or(side).max(1)
    };
    (scale(width), scale(height))
}

/// The dimensions and thumbnail of the picture at `path`, `None` if it is not a PNG, JPEG,
/// WebP or GIF picture (or its header is truncated or malformed). See [`picture_from`].
pub fn picture(path: &Path) -> Result<Option<ImageInfo>, ThumbError> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    picture_from(BufReader::new(file), size)
}

/// The dimensions and thumbnail of the PNG, JPEG, WebP or GIF picture `r` holds (`size`
/// bytes; a GIF's first frame), `None` if it is none of them, its header is truncated or malformed, or its dimensions are beyond
/// [`MAX_IMAGE_SIDE`]. The dimensions are as shown (after a JPEG's EXIF orientation).
///
/// The thumbnail ([`THUMB_SIDE`] at most, JPEG, or PNG for a picture with transparency if
/// that fits) is made only for a picture of at most [`MAX_PICTURE_PIXELS`] and
/// [`MAX_PICTURE_BYTES`] that decodes; otherwise (a decompression bomb, a corrupt picture)
/// `thumb` is `None`, and nothing beyond the header was read or allocated for a picture
/// out of bounds. Errors are only those of reading `r`.
pub fn picture_from<R: BufRead + Seek>(
    mut r: R,
    size: u64,
) -> Result<Option<ImageInfo>, ThumbError> {
    let Some(header) = read_header(&mut r)? else {
        return Ok(None);
    };
    let sides = 1..=MAX_IMAGE_SIDE;
    if !sides.contains(&header.width) || !sides.contains(&header.height) {
        return Ok(None);
    }
    let pixels = u64::from(header.width) * u64::from(header.height);
    let thumb = if pixels <= MAX_PICTURE_PIXELS && size <= MAX_PICTURE_BYTES {
        r.rewind()?;
        match thumbnail_of(r, &header) {
            Ok(t) => Some(t),
            Err(ThumbError::Io(e)) => return Err(ThumbError::Io(e)),
            Err(e) => {
                tracing::debug!("no thumbnail: {e}");
                None
            }
        }
    } else {
        None
    };
    let (width, height) = header.shown();
    Ok(Some(ImageInfo {
        width,
        height,
        thumb,
    }))
}

fn thumbnail_of<R: BufRead + Seek>(mut r: R, header: &Header) -> Result<Thumbnail, ThumbError> {
    let dims = (header.width, header.height);
    let limits = limits(MAX_IMAGE_SIDE, MAX_DECODED_BYTES);
    let picture = if header.format == Codec::Jpeg {
        // The JPEG decoder reads the whole input: bound it, in case the file grew.
        let mut bytes = Vec::new();
        r.by_ref()
            .take(MAX_PICTURE_BYTES + 1)
            .read_to_end(&mut bytes)?;
        if bytes.len() as u64 > MAX_PICTURE_BYTES {
            return Err(ThumbError::TooLarge);
        }
        decode(
            Cursor::new(bytes),
            header.format,
            limits,
            dims,
            MAX_DECODED_BYTES,
        )?
    } else {
        decode(r, header.format, limits, dims, MAX_DECODED_BYTES)?
    };
    let (w, h) = fit(picture.width(), picture.height(), THUMB_SIDE);
    let mut small = if (w, h) == picture.dimensions() {
        picture
    } else {
        picture.thumbnail_exact(w, h)
    };
    small.apply_orientation(header.orientation);
    encode_thumbnail(&small)
}

/// Encodes a small picture as a thumbnail: PNG if it has transparency and that fits, else
/// JPEG at the highest quality of [`JPEG_QUALITIES`] that fits [`MAX_THUMB_BYTES`].
fn encode_thumbnail(small: &DynamicImage) -> Result<Thumbnail, ThumbError> {
    let (width, height) = small.dimensions();
    let thumb = |format, bytes| Thumbnail {
        format,
        width,
        height,
        bytes,
    };
    let transparent = small.color().has_alpha().then(|| small.to_rgba8());
    let transparent = transparent.filter(|rgba| rgba.pixels().any(|p| p.0[3] < 255));
    if let Some(rgba) = &transparent {
        let mut png = Vec::new();
        PngEncoder::new_with_quality(&mut png, CompressionType::Best, FilterType::Adaptive)
            .write_image(rgba.as_raw(), width, height, ExtendedColorType::Rgba8)?;
        if png.len() <= MAX_THUMB_BYTES {
            return Ok(thumb(ImageFormat::Png, png));
        }
    }
    let rgb = match &transparent {
        Some(rgba) => on_white(rgba),
        None => small.to_rgb8(),
    };
    for quality in JPEG_QUALITIES {
        let mut jpeg = Vec::new();
        JpegEncoder::new_with_quality(&mut jpeg, quality).encode_image(&rgb)?;
        if jpeg.len() <= MAX_THUMB_BYTES {
            return Ok(thumb(ImageFormat::Jpeg, jpeg));
        }
    }
    Err(ThumbError::NoFit)
}

/// A picture with transparency laid on white (for a JPEG, which has no alpha).
fn on_white(rgba: &RgbaImage) -> RgbImage {
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        let blend = |c: u8| {
            let v = (u16::from(c) * u16::from(a) + 255 * (255 - u16::from(a)) + 127) / 255;
            u8::try_from(v).unwrap_or(u8::MAX)
        };
        image::Rgb([blend(r), blend(g), blend(b)])
    })
}

/// Checks a thumbnail received from the network before it is shown: the protocol's bounds
/// ([`Thumbnail::check`]), then that its header states exactly `t.width`×`t.height`, then
/// that it decodes in full within [`MAX_THUMB_SIDE`] per side and a small allocation.
pub fn check_thumbnail(t: &Thumbnail) -> Result<(), ThumbError> {
    t.check()?;
    let mut r = Cursor::new(t.bytes.as_slice());
    let format = match t.format {
        ImageFormat::Png => Codec::Png,
        ImageFormat::Jpeg => Codec::Jpeg,
        ImageFormat::Webp => Codec::WebP,
    };
    let header = read_header(&mut r)?
        .filter(|h| h.format == format)
        .ok_or(ThumbError::NotAPicture)?;
    let claimed = (t.width, t.height);
    if (header.width, header.height) != claimed {
        return Err(ThumbError::Dimensions {
            header: (header.width, header.height),
            claimed,
        });
    }
    r.set_position(0);
    let limits = limits(MAX_THUMB_SIDE, MAX_THUMB_DECODED_BYTES);
    decode(r, format, limits, claimed, MAX_THUMB_DECODED_BYTES)?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::{Duration, Instant};

    use image::{Rgb, Rgba};
    use kith_protocol::files::clean_mime;

    use super::*;

    fn gradient(width: u32, height: u32) -> RgbImage {
        RgbImage::from_fn(width, height, |x, y| {
            Rgb([(x * 255 / width) as u8, (y * 255 / height) as u8, 128])
        })
    }

    fn png_of(img: &DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    fn jpeg_of(img: &RgbImage) -> Vec<u8> {
        let mut out = Vec::new();
        JpegEncoder::new_with_quality(&mut out, 90)
            .encode_image(img)
            .unwrap();
        out
    }

    fn info_of(bytes: &[u8]) -> Option<ImageInfo> {
        picture_from(Cursor::new(bytes), bytes.len() as u64).unwrap()
    }

    /// The thumbnail of a `width`×`height` picture: in bounds, the right shape, accepted.
    fn assert_good_thumb(info: &ImageInfo, width: u32, height: u32) -> &Thumbnail {
        assert_eq!((info.width, info.height), (width, height));
        let t = info.thumb.as_ref().expect("a thumbnail");
        assert_eq!(t.width.max(t.height), THUMB_SIDE);
        let ratio = f64::from(width) / f64::from(height);
        let thumb_ratio = f64::from(t.width) / f64::from(t.height);
        assert!(
            (ratio - thumb_ratio).abs() / ratio < 0.02,
            "{ratio} {thumb_ratio}"
        );
        assert!(t.bytes.len() <= MAX_THUMB_BYTES);
        check_thumbnail(t).unwrap();
        t
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend((data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend(kind);
        out.extend(data);
        let crc = crc32(&out[start..]);
        out.extend(crc.to_be_bytes());
    }

    /// A PNG whose IHDR (valid CRC) claims `width`×`height` RGB, with a tiny IDAT.
    fn claimed_png(width: u32, height: u32) -> Vec<u8> {
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend(width.to_be_bytes());
        ihdr.extend(height.to_be_bytes());
        ihdr.extend([8, 2, 0, 0, 0]);
        chunk(&mut png, b"IHDR", &ihdr);
        // zlib: a stored block of 3 zero bytes.
        chunk(
            &mut png,
            b"IDAT",
            &[
                0x78, 0x01, 0x01, 0x03, 0x00, 0xFC, 0xFF, 0, 0, 0, 0, 0x03, 0, 0x01,
            ],
        );
        chunk(&mut png, b"IEND", &[]);
        png
    }

    #[test]
    fn crc_is_the_png_one() {
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
    }

    #[test]
    fn png_thumbnail_keeps_the_shape_and_fits() {
        let png = png_of(&DynamicImage::ImageRgb8(gradient(1200, 800)));
        let info = info_of(&png).unwrap();
        let t = assert_good_thumb(&info, 1200, 800);
        assert_eq!((t.width, t.height), (160, 107));
        assert_eq!(t.format, ImageFormat::Jpeg);
    }

    #[test]
    fn picture_reads_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tall.png");
        std::fs::write(&path, png_of(&DynamicImage::ImageRgb8(gradient(300, 900)))).unwrap();
        let info = picture(&path).unwrap().unwrap();
        let t = assert_good_thumb(&info, 300, 900);
        assert_eq!((t.width, t.height), (53, 160));
        assert!(picture(&dir.path().join("missing")).is_err());
        let text = dir.path().join("a.txt");
        std::fs::write(&text, "hello").unwrap();
        assert_eq!(picture(&text).unwrap(), None);
    }

    fn noise(width: u32, height: u32) -> RgbaImage {
        let mut seed = 1u32;
        RgbaImage::from_fn(width, height, |_, _| {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            Rgba(seed.to_le_bytes())
        })
    }

    #[test]
    fn jpeg_thumbnail_keeps_the_shape_and_fits() {
        let info = info_of(&jpeg_of(&gradient(1200, 800))).unwrap();
        assert_eq!(
            assert_good_thumb(&info, 1200, 800).format,
            ImageFormat::Jpeg
        );
    }

    #[test]
    fn quality_goes_down_until_the_thumbnail_fits() {
        // Noise at thumbnail size: far over 16 KiB at the first quality.
        let rgb = DynamicImage::ImageRgba8(noise(THUMB_SIDE, THUMB_SIDE)).to_rgb8();
        let mut first = Vec::new();
        JpegEncoder::new_with_quality(&mut first, JPEG_QUALITIES[0])
            .encode_image(&rgb)
            .unwrap();
        assert!(first.len() > MAX_THUMB_BYTES, "{}", first.len());
        let info = info_of(&png_of(&DynamicImage::ImageRgb8(rgb))).unwrap();
        assert_eq!(
            assert_good_thumb(&info, THUMB_SIDE, THUMB_SIDE).format,
            ImageFormat::Jpeg
        );
        // Transparent noise: too large as PNG, so JPEG on white.
        let t = encode_thumbnail(&DynamicImage::ImageRgba8(noise(THUMB_SIDE, 100))).unwrap();
        assert_eq!(
            (t.format, t.width, t.height),
            (ImageFormat::Jpeg, THUMB_SIDE, 100)
        );
        check_thumbnail(&t).unwrap();
    }

    fn webp_of(img: &RgbImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, Codec::WebP).unwrap();
        out.into_inner()
    }

    #[test]
    fn webp_and_gif_pictures_get_thumbnails() {
        let img = gradient(480, 320);
        let info = info_of(&webp_of(&img)).unwrap();
        assert_good_thumb(&info, 480, 320);
        let mut gif = Vec::new();
        let rgba = DynamicImage::ImageRgb8(img).to_rgba8();
        image::codecs::gif::GifEncoder::new_with_speed(&mut gif, 30)
            .encode(rgba.as_raw(), 480, 320, ExtendedColorType::Rgba8)
            .unwrap();
        let info = info_of(&gif).unwrap();
        assert_good_thumb(&info, 480, 320);
    }

    #[test]
    fn webp_thumbnails_from_the_network_are_checked_too() {
        let t = Thumbnail {
            format: ImageFormat::Webp,
            width: 120,
            height: 80,
            bytes: webp_of(&gradient(120, 80)),
        };
        check_thumbnail(&t).unwrap();
        let lying = Thumbnail { height: 81, ..t };
        assert!(matches!(
            check_thumbnail(&lying),
            Err(ThumbError::Dimensions { .. })
        ));
    }

    #[test]
    fn small_pictures_are_not_scaled_up() {
        let info = info_of(&png_of(&DynamicImage::ImageRgb8(gradient(40, 30)))).unwrap();
        let t = info.thumb.unwrap();
        assert_eq!((t.width, t.height), (40, 30));
        check_thumbnail(&t).unwrap();
    }

    #[test]
    fn transparent_pictures_get_png_thumbnails() {
        let img = RgbaImage::from_fn(600, 400, |x, y| {
            Rgba([
                200,
                30,
                30,
                if (x / 50 + y / 50) % 2 == 0 { 255 } else { 0 },
            ])
        });
        let info = info_of(&png_of(&DynamicImage::ImageRgba8(img))).unwrap();
        assert_eq!(assert_good_thumb(&info, 600, 400).format, ImageFormat::Png);
        // An alpha channel that is all opaque: JPEG.
        let opaque = RgbaImage::from_pixel(600, 400, Rgba([1, 2, 3, 255]));
        let info = info_of(&png_of(&DynamicImage::ImageRgba8(opaque))).unwrap();
        assert_eq!(assert_good_thumb(&info, 600, 400).format, ImageFormat::Jpeg);
    }

    #[test]
    fn exif_orientation_turns_dimensions_and_thumbnail() {
        let jpeg = jpeg_of(&gradient(1200, 800));
        // APP1 "Exif": a big-endian TIFF header and one IFD entry, orientation 6 (90°).
        let mut tiff = b"MM\0\x2a\0\0\0\x08\0\x01".to_vec();
        tiff.extend([0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0]);
        tiff.extend([0, 0, 0, 0]);
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend(tiff);
        let mut rotated = vec![0xFF, 0xD8, 0xFF, 0xE1];
        rotated.extend((app1.len() as u16 + 2).to_be_bytes());
        rotated.extend(app1);
        rotated.extend(&jpeg[2..]);
        let info = info_of(&rotated).unwrap();
        let t = assert_good_thumb(&info, 800, 1200);
        assert_eq!((t.width, t.height), (107, 160));
    }

    #[test]
    fn decompression_bombs_give_dimensions_without_thumbnail_fast() {
        let start = Instant::now();
        let bomb = claimed_png(60_000, 60_000);
        assert!(bomb.len() < 100);
        assert_eq!(
            info_of(&bomb),
            Some(ImageInfo {
                width: 60_000,
                height: 60_000,
                thumb: None,
            })
        );
        // More pixels than decoded, each side in bounds.
        let wide = claimed_png(MAX_IMAGE_SIDE, 1000);
        assert_eq!(info_of(&wide).unwrap().thumb, None);
        // Beyond what a file message may state: not a picture to describe.
        assert_eq!(info_of(&claimed_png(70_000, 10)), None);
        assert_eq!(info_of(&claimed_png(0, 10)), None);
        // A JPEG frame header claiming 65535×65535.
        let mut jpeg = jpeg_of(&gradient(16, 16));
        let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        jpeg[sof + 5..sof + 9].copy_from_slice(&[0xFF; 4]);
        let info = info_of(&jpeg).unwrap();
        assert_eq!((info.width, info.height, info.thumb), (65535, 65535, None));
        // A WebP canvas (VP8X) and a lossless frame (VP8L) beyond the bounds.
        let mut vp8x = b"RIFF\x16\0\0\0WEBPVP8X\x0a\0\0\0\0\0\0\0".to_vec();
        vp8x.extend(&(60_000u32 - 1).to_le_bytes()[..3]);
        vp8x.extend(&(60_000u32 - 1).to_le_bytes()[..3]);
        let info = info_of(&vp8x).unwrap();
        assert_eq!(
            (info.width, info.height, info.thumb),
            (60_000, 60_000, None)
        );
        let mut vp8l = b"RIFF\x16\0\0\0WEBPVP8L\x05\0\0\0\x2f".to_vec();
        vp8l.extend((0x3FFF_u32 | (0x3FFF << 14)).to_le_bytes());
        vp8l.extend([0; 8]);
        let info = info_of(&vp8l).unwrap();
        assert_eq!((info.width, info.height, info.thumb), (16384, 16384, None));
        // A GIF whose logical screen is 65535×65535.
        let gif = b"GIF89a\xff\xff\xff\xff\0\0\0;";
        let info = info_of(gif).unwrap();
        assert_eq!((info.width, info.height, info.thumb), (65535, 65535, None));
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn a_lying_header_in_bounds_gives_no_thumbnail() {
        // 2000×2000 claimed, 3 bytes of pixels: the decoder fails, the node does not.
        let info = info_of(&claimed_png(2000, 2000)).unwrap();
        assert_eq!((info.width, info.height, info.thumb), (2000, 2000, None));
    }

    #[test]
    fn truncated_and_corrupt_pictures_do_not_panic() {
        let jpeg = jpeg_of(&gradient(300, 200));
        let png = png_of(&DynamicImage::ImageRgb8(gradient(300, 200)));
        for bytes in [&jpeg, &png] {
            let cuts = (0..64).chain((64..bytes.len()).step_by(97));
            for cut in cuts {
                let info = picture_from(Cursor::new(&bytes[..cut]), cut as u64).unwrap();
                if let Some(t) = info.and_then(|i| i.thumb) {
                    check_thumbnail(&t).unwrap();
                }
            }
            let mut flipped = bytes.clone();
            for i in (20..flipped.len()).step_by(13) {
                flipped[i] ^= 0x5A;
            }
            let _ = info_of(&flipped);
        }
        // A JPEG cut right after its frame header: dimensions, and no panic decoding.
        let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        let info = info_of(&jpeg[..sof + 12]).unwrap();
        assert_eq!((info.width, info.height), (300, 200));
        // Segments that lie about their length.
        assert_eq!(info_of(&[0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x01]), None);
        assert_eq!(info_of(&[0xFF, 0xD8, 0xFF, 0xE0, 0xFF, 0xFF, 1, 2]), None);
        assert_eq!(info_of(&[0xFF, 0xD8, 0xFF]), None);
        assert_eq!(info_of(b""), None);
        assert_eq!(info_of(b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR"), None);
    }

    #[test]
    fn received_thumbnails_are_checked() {
        let info = info_of(&png_of(&DynamicImage::ImageRgb8(gradient(1200, 800)))).unwrap();
        let good = info.thumb.unwrap();
        check_thumbnail(&good).unwrap();
        let with = |f: &dyn Fn(&mut Thumbnail)| {
            let mut t = good.clone();
            f(&mut t);
            check_thumbnail(&t)
        };
        assert!(matches!(
            with(&|t| t.width += 1),
            Err(ThumbError::Dimensions {
                header: (160, 107),
                claimed: (161, 107)
            })
        ));
        assert!(matches!(
            with(&|t| t.bytes[0] = 0),
            Err(ThumbError::Bounds(_))
        ));
        assert!(matches!(
            with(&|t| t.format = ImageFormat::Png),
            Err(ThumbError::Bounds(_))
        ));
        assert!(matches!(
            with(&|t| t.bytes.resize(MAX_THUMB_BYTES + 1, 0)),
            Err(ThumbError::Bounds(_))
        ));
        assert!(matches!(
            with(&|t| t.bytes.truncate(200)),
            Err(ThumbError::Decode(_))
        ));
        // A PNG header in bounds over nothing decodable.
        let liar = Thumbnail {
            format: ImageFormat::Png,
            width: 300,
            height: 300,
            bytes: claimed_png(300, 300),
        };
        assert!(matches!(check_thumbnail(&liar), Err(ThumbError::Decode(_))));
        // A header beyond the thumbnail bounds, claimed small.
        let big = Thumbnail {
            width: 300,
            height: 300,
            bytes: claimed_png(5000, 5000),
            ..liar.clone()
        };
        assert!(matches!(
            check_thumbnail(&big),
            Err(ThumbError::Dimensions { .. })
        ));
        let webp = Thumbnail {
            format: ImageFormat::Webp,
            bytes: b"RIFF\0\0\0\0WEBPVP8 ".to_vec(),
            ..liar
        };
        assert!(check_thumbnail(&webp).is_err());
    }

    #[test]
    fn fit_keeps_the_aspect_and_never_scales_up() {
        assert_eq!(fit(1200, 800, 160), (160, 107));
        assert_eq!(fit(800, 1200, 160), (107, 160));
        assert_eq!(fit(MAX_IMAGE_SIDE, 1, 160), (160, 1));
        assert_eq!(fit(1, MAX_IMAGE_SIDE, 160), (1, 160));
        assert_eq!(fit(160, 10, 160), (160, 10));
        assert_eq!(fit(1, 1, 160), (1, 1));
    }

    #[test]
    fn media_types_by_signature() {
        let cases: &[(&[u8], &str)] = &[
            (b"\x89PNG\r\n\x1a\n\0\0", "image/png"),
            (&[0xFF, 0xD8, 0xFF, 0xE0], "image/jpeg"),
            (b"GIF89a\x01\0", "image/gif"),
            (b"RIFF\x10\0\0\0WEBPVP8 ", "image/webp"),
            (b"RIFF\x10\0\0\0WAVEfmt ", "audio/wav"),
            (b"II*\0\x08\0", "image/tiff"),
            (b"%PDF-1.7\n", "application/pdf"),
            (b"PK\x03\x04\x14\0", "application/zip"),
            (&[0x1F, 0x8B, 0x08, 0x00], "application/gzip"),
            (b"\0\0\0\x18ftypisom\0\0\x02\0", "video/mp4"),
            (b"\0\0\0\x14ftypqt  \0\0\x02\0", "video/quicktime"),
            (b"\0\0\0\x18ftypheic\0\0\0\0", "image/heic"),
            (
                b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm",
                "video/webm",
            ),
            (
                b"\x1a\x45\xdf\xa3\x9f\x42\x82\x88matroska",
                "video/x-matroska",
            ),
            (b"OggS\0\x02\0\0\0\0\0\0\0\0", "audio/ogg"),
            (b"ID3\x04\0\0\0\0\0\0", "audio/mpeg"),
            (b"fLaC\0\0\0\x22", "audio/flac"),
            (b"hello, world\n", "text/plain"),
            ("caf\u{e9}".as_bytes(), "text/plain"),
            // A character cut at the end of the head is still text.
            (&"é".as_bytes()[..1], "text/plain"),
            (b"\0\x01\x02\x03", OCTET_STREAM),
            (b"text\0with a NUL", OCTET_STREAM),
            (&[0xC3, 0x28], OCTET_STREAM),
            (b"", OCTET_STREAM),
        ];
        for (head, want) in cases {
            assert_eq!(media_type(head, "file"), *want, "{head:?}");
        }
        // The signature wins over the extension.
        assert_eq!(media_type(b"\x89PNG\r\n\x1a\n", "photo.jpg"), "image/png");
        assert_eq!(media_type(b"%PDF-1.4", "x.exe"), "application/pdf");
        // ZIP-based formats keep their type; a plain ZIP named .docx... is a ZIP named so.
        assert_eq!(
            media_type(b"PK\x03\x04", "report.docx"),
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
        );
        assert_eq!(media_type(b"PK\x03\x04", "a.png"), "application/zip");
        // Text keeps a textual extension's type, not another's.
        assert_eq!(media_type(b"a,b\n1,2\n", "data.csv"), "text/csv");
        assert_eq!(media_type(b"{\"a\": 1}", "x.json"), "application/json");
        assert_eq!(media_type(b"<svg xmlns=", "logo.svg"), "image/svg+xml");
        assert_eq!(media_type(b"just words", "fake.png"), "text/plain");
    }

    #[test]
    fn media_types_by_extension() {
        let binary = [0u8, 1, 2, 3];
        assert_eq!(media_type(&binary, "song.MP3"), "audio/mpeg");
        assert_eq!(media_type(&binary, "clip.mkv"), "video/x-matroska");
        assert_eq!(media_type(&binary, "archive.tar"), "application/x-tar");
        assert_eq!(
            media_type(&binary, "sheet.XLSX"),
            "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
        );
        assert_eq!(media_type(b"", "notes.md"), "text/markdown");
        assert_eq!(media_type(&binary, "dir/sub\\a.b.jpeg"), "image/jpeg");
        assert_eq!(media_type(&binary, "noext"), OCTET_STREAM);
        assert_eq!(media_type(&binary, "weird.ext"), OCTET_STREAM);
        for (ext, mime) in EXTENSIONS {
            assert_eq!(clean_mime(mime), *mime, "{ext}");
            assert_eq!(media_type(&binary, &format!("f.{ext}")), *mime);
        }
        for e in ZIP_BASED {
            assert!(EXTENSIONS.iter().any(|(x, _)| x == e), "{e}");
        }
    }

    #[test]
    fn hostile_names_give_well_formed_types() {
        let binary = [0u8, 1, 2, 3];
        let names = [
            "a.png\u{202E}gpj.exe",
            "../../etc/passwd",
            "..",
            ".",
            "",
            "a.",
            "a./",
            "photo.png/",
            "photo.pNg ",
            "a.😀",
            "a.ｐｎｇ",
            "a.png; charset=x",
            "a.text/html",
            &format!("a.{}", "x".repeat(10_000)),
            &"é".repeat(5000),
        ];
        for name in names {
            let t = media_type(&binary, name);
            assert_eq!(clean_mime(&t), t, "{name:?}");
            assert_eq!(t, OCTET_STREAM, "{name:?}");
        }
        assert_eq!(media_type(&binary, ".png"), "image/png");
        assert_eq!(media_type(&binary, "x.pdf\0.png"), "image/png");
    }
}
