//! Text for terminals: shortened ids, UTC times, and text from the network made safe to
//! print. Shared by the `kith` CLI and the testnet's reports, so both show ids the same way.

/// A short form of a PeerId for display: its last 8 characters (every ed25519 PeerId
/// starts with the same `12D3KooW`).
pub fn short_peer(peer: &str) -> String {
    let peer = clean(peer);
    let chars: Vec<char> = peer.chars().collect();
    chars[chars.len().saturating_sub(8)..].iter().collect()
}

/// Makes text from the network safe to print on one terminal line: control characters and
/// bidirectional overrides (which could rewrite the terminal or disguise text) are replaced.
pub fn clean(text: &str) -> String {
    clean_multiline(text).replace('\n', "\u{FFFD}")
}

/// As [`clean`], but keeps newlines.
pub fn clean_multiline(text: &str) -> String {
    text.chars()
        .map(|c| {
            let bidi = matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}');
            if (c.is_control() && c != '\n') || bidi {
                '\u{FFFD}'
            } else {
                c
            }
        })
        .collect()
}

/// A byte count for people: `512 B`, `1.5 KiB`, `50.0 MiB`, `4.0 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `YYYY-MM-DD HH:MM:SS` in UTC for seconds since the Unix epoch.
pub fn format_utc(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days.saturating_add(719_468);
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m as u32, d as u32)
}

#[cfg(test)]
mod tests {
    #[test]
    fn byte_counts_read_well() {
        use super::human_bytes;
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(50 << 20), "50.0 MiB");
        assert_eq!(human_bytes(4 << 30), "4.0 GiB");
    }

    use super::*;

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00");
        assert_eq!(format_utc(1_700_000_000), "2023-11-14 22:13:20");
        assert_eq!(format_utc(951_825_600), "2000-02-29 12:00:00");
        // Absurd values do not panic.
        let _ = format_utc(u64::MAX);
    }

    #[test]
    fn hostile_text_is_neutralised() {
        assert_eq!(clean("a\x1b[2Jb"), "a\u{FFFD}[2Jb");
        assert_eq!(clean("x\u{202E}y"), "x\u{FFFD}y");
        assert_eq!(clean("one\ntwo"), "one\u{FFFD}two");
        assert_eq!(short_peer("12D3KooWabcdefgh12345678"), "12345678");
        assert_eq!(short_peer("abc"), "abc");
    }
}
