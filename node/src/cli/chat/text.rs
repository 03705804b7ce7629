//! Text from the network made safe and sized for a terminal: sanitising (control
//! characters, ANSI escapes, bidi controls), word wrapping to a width, and bounded work for
//! very long messages.

use unicode_width::UnicodeWidthChar;

/// Shown instead of a character that could rewrite the terminal or disguise text.
pub const REPLACEMENT: char = '\u{FFFD}';

/// Whether `c` must not reach a terminal as it is: control characters (the ESC of ANSI
/// sequences, CR, BEL, C1 controls…) and the bidirectional controls that reorder text
/// (embeddings, overrides, isolates, and the implicit marks).
fn is_hostile(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}'
        )
}

/// One character as drawn: hostile ones replaced; tabs (and newlines, for one-line uses)
/// become spaces.
fn safe_char(c: char) -> char {
    match c {
        '\t' | '\n' => ' ',
        c if is_hostile(c) => REPLACEMENT,
        c => c,
    }
}

/// `text` made safe to draw on one line (names, excerpts, the plain mode's lines).
pub fn one_line(text: &str) -> String {
    text.chars().map(safe_char).collect()
}

/// `text` safe to draw on one line, cut to at most `max` columns with `…` at the end.
pub fn fit(text: &str, max: usize) -> String {
    if width(text) <= max {
        return one_line(text);
    }
    let mut out = String::new();
    let mut used = 0;
    for c in text.chars().map(safe_char) {
        let w = c.width().unwrap_or(0);
        if used + w + 1 > max {
            break;
        }
        used += w;
        out.push(c);
    }
    if max > 0 {
        out.push('…');
    }
    out
}

/// Display width of `text` in terminal columns (after [`one_line`]).
pub fn width(text: &str) -> usize {
    text.chars()
        .map(|c| safe_char(c).width().unwrap_or(0))
        .sum()
}

/// A text wrapped into lines of at most `width` columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wrapped {
    /// The lines, safe to draw.
    pub lines: Vec<String>,
    /// Lines were left off after `max_lines` (the text goes on).
    pub truncated: bool,
}

/// Wraps `text` (its newlines kept) to `width` columns, breaking at spaces where it can
/// and inside a word longer than a line; hostile characters are replaced. Stops after
/// `max_lines` lines, so a huge message costs no more than what is shown.
pub fn wrap(text: &str, width: usize, max_lines: usize) -> Wrapped {
    let width = width.max(1);
    let mut lines: Vec<String> = Vec::new();
    let mut truncated = false;
    'paragraphs: for paragraph in text.split('\n') {
        let mut line = String::new();
        let mut line_w = 0;
        let mut word = String::new();
        let mut word_w = 0;
        // Each char, plus a final space to flush the last word.
        for c in paragraph.chars().map(safe_char).chain(std::iter::once(' ')) {
            if lines.len() >= max_lines {
                truncated = true;
                break 'paragraphs;
            }
            let w = c.width().unwrap_or(0);
            if c != ' ' {
                if word_w + w > width {
                    // A word longer than a line: break it.
                    if line_w > 0 {
                        lines.push(std::mem::take(&mut line));
                        line_w = 0;
                    }
                    lines.push(std::mem::take(&mut word));
                    word_w = 0;
                }
                word.push(c);
                word_w += w;
                continue;
            }
            // A space ends a word: place it.
            if word_w > 0 {
                let gap = usize::from(line_w > 0);
                if line_w + gap + word_w > width {
                    lines.push(std::mem::take(&mut line));
                    line_w = 0;
                } else if gap == 1 {
                    line.push(' ');
                    line_w += 1;
                }
                line.push_str(&word);
                line_w += word_w;
                word.clear();
                word_w = 0;
            }
        }
        if lines.len() >= max_lines {
            truncated = true;
            break;
        }
        lines.push(line);
    }
    // Nothing was cut if the text ended right at the limit.
    if truncated && lines.len() == max_lines && text_fits(text, &lines) {
        truncated = false;
    }
    Wrapped { lines, truncated }
}

/// Whether `lines` already hold every non-space character of `text` (then nothing was cut).
fn text_fits(text: &str, lines: &[String]) -> bool {
    let shown: usize = lines
        .iter()
        .map(|l| l.chars().filter(|c| *c != ' ').count())
        .sum();
    let total = text
        .chars()
        .map(safe_char)
        .filter(|c| *c != ' ')
        .take(shown + 1)
        .count();
    total <= shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_bidi_controls_are_neutralised() {
        assert_eq!(one_line("a\x1b[2Jb"), "a\u{FFFD}[2Jb");
        assert_eq!(one_line("x\u{202E}y\u{2067}z"), "x\u{FFFD}y\u{FFFD}z");
        assert_eq!(one_line("bell\x07\r\u{9b}"), "bell\u{FFFD}\u{FFFD}\u{FFFD}");
        assert_eq!(one_line("two\nlines\ttab"), "two lines tab");
        assert_eq!(one_line("\u{200F}rtl mark"), "\u{FFFD}rtl mark");
        // Emoji sequences (joiners, variation selectors) stay.
        assert_eq!(one_line("❤️ 👩‍💻"), "❤️ 👩‍💻");
    }

    #[test]
    fn fit_cuts_with_an_ellipsis() {
        assert_eq!(fit("hello", 10), "hello");
        assert_eq!(fit("hello", 5), "hello");
        assert_eq!(fit("hello world", 8), "hello w…");
        assert_eq!(fit("\x1b[31mred", 20), "\u{FFFD}[31mred");
        assert_eq!(width("日本"), 4);
    }

    #[test]
    fn words_wrap_at_spaces_and_long_words_break() {
        let w = wrap("the quick brown fox jumps", 10, 100);
        assert_eq!(w.lines, ["the quick", "brown fox", "jumps"]);
        assert!(!w.truncated);
        let w = wrap("abcdefghijklmnop xy", 6, 100);
        assert_eq!(w.lines, ["abcdef", "ghijkl", "mnop", "xy"]);
        let w = wrap("one\n\ntwo", 10, 100);
        assert_eq!(w.lines, ["one", "", "two"]);
        // Wide characters count two columns.
        let w = wrap("日本語の文", 4, 100);
        assert_eq!(w.lines, ["日本", "語の", "文"]);
        // Every line fits.
        let text = "lorem ipsum dolor sit amet, consectetur adipiscing elit ".repeat(20);
        for line in wrap(&text, 17, 1000).lines {
            assert!(width(&line) <= 17, "{line:?}");
        }
    }

    #[test]
    fn huge_texts_stop_at_the_line_limit_quickly() {
        let text = "x".repeat(100 * 1024);
        let start = std::time::Instant::now();
        let w = wrap(&text, 80, 50);
        assert_eq!(w.lines.len(), 50);
        assert!(w.truncated);
        assert!(start.elapsed() < std::time::Duration::from_millis(200));
        let w = wrap("exactly two", 7, 2);
        assert_eq!(w.lines, ["exactly", "two"]);
        assert!(!w.truncated);
    }

    #[test]
    fn wrapped_hostile_text_is_safe() {
        let w = wrap("\x1b]0;pwned\x07 ok", 40, 10);
        assert_eq!(w.lines, ["\u{FFFD}]0;pwned\u{FFFD} ok"]);
    }
}
