//! The input line: text being written and a cursor, edited by keys and paste.

use unicode_width::UnicodeWidthChar;

/// Shown for a newline inside the input (a pasted multi-line text).
const NEWLINE_MARK: char = '↵';

/// One line of input with a cursor (counted in characters, not bytes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InputLine {
    chars: Vec<char>,
    cursor: usize,
}

impl InputLine {
    /// The text written so far.
    pub fn text(&self) -> String {
        self.chars.iter().collect()
    }

    /// Whether nothing is written.
    pub fn is_empty(&self) -> bool {
        self.chars.is_empty()
    }

    /// Replaces the text (the cursor goes to its end), e.g. to edit a message.
    pub fn set(&mut self, text: &str) {
        self.chars = text.chars().collect();
        self.cursor = self.chars.len();
    }

    /// Empties the line.
    pub fn clear(&mut self) {
        self.chars.clear();
        self.cursor = 0;
    }

    /// Inserts a typed character at the cursor.
    pub fn insert(&mut self, c: char) {
        self.chars.insert(self.cursor, c);
        self.cursor += 1;
    }

    /// Inserts pasted text at the cursor: CRLF and CR become newlines, tabs spaces, other
    /// control characters are dropped.
    pub fn paste(&mut self, text: &str) {
        let text = text.replace("\r\n", "\n").replace('\r', "\n");
        for c in text.chars() {
            match c {
                '\n' => self.insert('\n'),
                '\t' => self.insert(' '),
                c if c.is_control() => {}
                c => self.insert(c),
            }
        }
    }

    /// Deletes the character before the cursor.
    pub fn backspace(&mut self) {
        if self.cursor > 0 {
            self.cursor -= 1;
            self.chars.remove(self.cursor);
        }
    }

    /// Deletes the character under the cursor.
    pub fn delete(&mut self) {
        if self.cursor < self.chars.len() {
            self.chars.remove(self.cursor);
        }
    }

    /// Moves the cursor one character left.
    pub fn left(&mut self) {
        self.cursor = self.cursor.saturating_sub(1);
    }

    /// Moves the cursor one character right.
    pub fn right(&mut self) {
        self.cursor = (self.cursor + 1).min(self.chars.len());
    }

    /// Moves the cursor to the start.
    pub fn home(&mut self) {
        self.cursor = 0;
    }

    /// Moves the cursor to the end.
    pub fn end(&mut self) {
        self.cursor = self.chars.len();
    }

    /// What to draw in `width` columns, and the cursor's column in it: the part of the text
    /// around the cursor, scrolled so the cursor stays visible.
    pub fn view(&self, width: usize) -> (String, usize) {
        let width = width.max(1);
        let shown: Vec<(char, usize)> = self
            .chars
            .iter()
            .map(|&c| {
                let c = if c == '\n' { NEWLINE_MARK } else { c };
                (c, c.width().unwrap_or(0))
            })
            .collect();
        // Start far enough right that the cursor (plus one cell for it) fits.
        let mut start = 0;
        let mut before: usize = shown[..self.cursor].iter().map(|(_, w)| w).sum();
        while before + 1 > width && start < self.cursor {
            before -= shown[start].1;
            start += 1;
        }
        let mut text = String::new();
        let mut used = 0;
        for &(c, w) in &shown[start..] {
            if used + w > width {
                break;
            }
            used += w;
            text.push(c);
        }
        (text, before)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_editing() {
        let mut l = InputLine::default();
        for c in "helo".chars() {
            l.insert(c);
        }
        l.left();
        l.insert('l');
        assert_eq!(l.text(), "hello");
        l.home();
        l.delete();
        assert_eq!(l.text(), "ello");
        l.end();
        l.backspace();
        assert_eq!(l.text(), "ell");
        l.home();
        l.backspace(); // nothing before the cursor
        l.left();
        assert_eq!((l.text().as_str(), l.view(80).1), ("ell", 0));
        l.right();
        l.right();
        l.right();
        l.right(); // past the end stays at the end
        l.insert('!');
        assert_eq!(l.text(), "ell!");
    }

    #[test]
    fn paste_keeps_newlines_and_drops_controls() {
        let mut l = InputLine::default();
        l.paste("a\r\nb\x1b[31m\tc");
        assert_eq!(l.text(), "a\nb[31m c");
        assert_eq!(l.view(80).0, "a↵b[31m c");
    }

    #[test]
    fn the_view_scrolls_to_the_cursor() {
        let mut l = InputLine::default();
        l.set("0123456789");
        assert_eq!(l.view(5), ("6789".to_owned(), 4));
        l.home();
        assert_eq!(l.view(5), ("01234".to_owned(), 0));
        l.set("日本語");
        assert_eq!(l.view(4), ("語".to_owned(), 2));
    }
}
