//! Drawing the chat client's state with ratatui: the chats list, the open chat's
//! messages, the status line, the input line and the footer. Everything from the network
//! goes through `text` first, so no cell holds a control character.

use kith_client::model::{MessageBody, MessageInfo};
use kith_client::text::human_bytes;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph};

use super::state::{App, Compose, Connection, EMOJIS, NOT_REACHABLE};
use super::text::{fit, one_line, width, wrap};

/// Below this width the chats list is hidden unless asked for (F2).
pub const NARROW: u16 = 60;
/// Width of the chats list.
const LIST_WIDTH: u16 = 22;
/// At most this many lines of one message are drawn.
const MAX_MESSAGE_LINES: usize = 200;
/// Indent of a message's text under its header.
const INDENT: usize = 2;

/// Draws the whole screen.
pub fn draw(frame: &mut Frame, app: &App) {
    let area = frame.area();
    let [top, status, input, footer] = Layout::vertical([
        Constraint::Min(1),
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(1),
    ])
    .areas(area);
    // F2 flips the default: shown on a wide terminal, hidden on a narrow one.
    let list_shown = (area.width >= NARROW) != app.show_list;
    let chat_area = if list_shown {
        let list_w = LIST_WIDTH.min(top.width / 2).max(1);
        let [list, chat] =
            Layout::horizontal([Constraint::Length(list_w), Constraint::Min(1)]).areas(top);
        draw_list(frame, app, list);
        chat
    } else {
        top
    };
    draw_chat(frame, app, chat_area);
    draw_status(frame, app, status);
    draw_input(frame, app, input);
    draw_footer(frame, app, footer);
    if app.help {
        draw_help(frame, area);
    }
}

fn draw_list(frame: &mut Frame, app: &App, area: Rect) {
    let block = Block::default()
        .borders(Borders::RIGHT)
        .border_style(Style::default().fg(Color::DarkGray));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let w = inner.width as usize;
    let mut lines = vec![Line::styled(
        fit("chats", w),
        Style::default().add_modifier(Modifier::BOLD),
    )];
    if app.chats.is_empty() {
        lines.push(Line::styled(
            fit("(none yet)", w),
            Style::default().fg(Color::DarkGray),
        ));
    }
    for (i, chat) in app.chats.iter().enumerate() {
        let open = app.open == Some(i);
        let marker = if open { "▶ " } else { "  " };
        let unread = chat
            .unread_label()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default();
        let left = if chat.active { "" } else { " (left)" };
        let name_w = w.saturating_sub(2 + unread.len() + left.len());
        let mut spans = vec![Span::raw(marker), Span::raw(fit(&chat.name, name_w))];
        if !left.is_empty() {
            spans.push(Span::styled(left, Style::default().fg(Color::DarkGray)));
        }
        if !unread.is_empty() {
            spans.push(Span::styled(
                unread,
                Style::default()
                    .fg(Color::Yellow)
                    .add_modifier(Modifier::BOLD),
            ));
        }
        let style = if open {
            Style::default().add_modifier(Modifier::BOLD)
        } else {
            Style::default()
        };
        lines.push(Line::from(spans).style(style));
    }
    frame.render_widget(Paragraph::new(lines), inner);
}

fn draw_chat(frame: &mut Frame, app: &App, area: Rect) {
    let [header, body] = Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).areas(area);
    let w = area.width as usize;
    let title = match app.open_chat() {
        Some(c) if !c.active => format!("{} · you left this group", one_line(&c.name)),
        Some(c) if app.member_count > 0 => {
            format!("{} · {} members", one_line(&c.name), app.member_count)
        }
        Some(c) => one_line(&c.name),
        None => "no chats: join or create a group (kith join / kith group create)".to_owned(),
    };
    frame.render_widget(
        Paragraph::new(Line::styled(
            fit(&title, w),
            Style::default().add_modifier(Modifier::BOLD | Modifier::UNDERLINED),
        )),
        header,
    );
    let height = body.height as usize;
    if height == 0 || app.open.is_none() {
        return;
    }
    if !app.loaded {
        frame.render_widget(
            Paragraph::new(Line::styled(
                "loading…",
                Style::default().fg(Color::DarkGray),
            )),
            body,
        );
        return;
    }
    let n = app.messages.len();
    app.oldest_drawn.set(true);
    if n == 0 {
        frame.render_widget(
            Paragraph::new(Line::styled(
                "no messages yet",
                Style::default().fg(Color::DarkGray),
            )),
            body,
        );
        return;
    }
    // The newest message drawn at the bottom; older ones above until the area is full.
    let mut bottom = n - 1 - app.scroll.min(n - 1);
    if let Some(s) = app.selected {
        bottom = bottom.max(s);
    }
    let mut blocks: Vec<Vec<Line<'static>>> = Vec::new();
    let mut used = 0;
    let mut i = bottom + 1;
    while i > 0 && used < height {
        i -= 1;
        let lines = message_lines(app, &app.messages[i], w, app.selected == Some(i));
        used += lines.len();
        blocks.push(lines);
    }
    // A selected message above the drawn ones: draw from it down instead.
    if let Some(s) = app.selected
        && s < i
    {
        blocks.clear();
        used = 0;
        let mut j = s + 1;
        while j > 0 && used < height {
            j -= 1;
            let lines = message_lines(app, &app.messages[j], w, j == s);
            used += lines.len();
            blocks.push(lines);
        }
        i = j;
    }
    app.oldest_drawn.set(i == 0);
    let mut lines: Vec<Line<'static>> = blocks.into_iter().rev().flatten().collect();
    // Keep the bottom: cut from the top.
    if lines.len() > height {
        lines.drain(..lines.len() - height);
    }
    let pad = height - lines.len();
    let mut all: Vec<Line<'static>> = std::iter::repeat_with(Line::default).take(pad).collect();
    all.extend(lines);
    frame.render_widget(Paragraph::new(all), body);
}

/// `HH:MM` (UTC) of a time in ms since the Unix epoch.
pub fn hh_mm(ms: u64) -> String {
    let day = ms / 1000 % 86_400;
    format!("{:02}:{:02}", day / 3600, day % 3600 / 60)
}

/// The lines of one message at `width` columns: a header (time, sender, marks), a reply
/// quote, the text wrapped, a file's name and size, the reactions.
pub fn message_lines(
    app: &App,
    m: &MessageInfo,
    width: usize,
    selected: bool,
) -> Vec<Line<'static>> {
    let dim = Style::default().fg(Color::DarkGray);
    let time = hh_mm(m.sent_at_ms);
    let sender = app.sender_of(m);
    let note = |text: String| -> Vec<Line<'static>> {
        wrap(&format!("{time} * {text}"), width, 3)
            .lines
            .into_iter()
            .map(|l| Line::styled(l, dim))
            .collect()
    };
    let mut lines: Vec<Line<'static>> = match &m.body {
        MessageBody::GroupCreated { name } => {
            note(format!("{sender} created the group '{}'", one_line(name)))
        }
        MessageBody::MembersAdded { members } => {
            let names: Vec<String> = members.iter().map(|p| app.name_of(p)).collect();
            note(format!("{} joined", names.join(", ")))
        }
        MessageBody::MembersRemoved { members } => {
            let names: Vec<String> = members.iter().map(|p| app.name_of(p)).collect();
            note(format!("{} left", names.join(", ")))
        }
        MessageBody::InviteCreated { .. } => note(format!("{sender} created an invite")),
        MessageBody::InviteRevoked { .. } => note(format!("{sender} revoked an invite")),
        MessageBody::Reaction { .. } | MessageBody::Edit { .. } | MessageBody::Delete { .. } => {
            Vec::new()
        }
        MessageBody::Text { .. } | MessageBody::File { .. } => {
            user_message_lines(app, m, width, &time, &sender)
        }
    };
    if selected {
        for line in &mut lines {
            *line = std::mem::take(line).style(Style::default().add_modifier(Modifier::REVERSED));
        }
    }
    lines
}

fn user_message_lines(
    app: &App,
    m: &MessageInfo,
    width: usize,
    time: &str,
    sender: &str,
) -> Vec<Line<'static>> {
    let dim = Style::default().fg(Color::DarkGray);
    let text_w = width.saturating_sub(INDENT).max(1);
    let pad = " ".repeat(INDENT);
    let own = m.sender == app.me;
    let name_style = Style::default().add_modifier(Modifier::BOLD).fg(if own {
        Color::Green
    } else {
        Color::Cyan
    });
    let mut header = vec![
        Span::styled(format!("{time} "), dim),
        Span::styled(fit(sender, width.saturating_sub(6 + 9)), name_style),
    ];
    if m.edited_at_ms.is_some() && !m.deleted {
        header.push(Span::styled(" (edited)", dim));
    }
    let mut lines = vec![Line::from(header)];
    if let Some(r) = &m.reply_to {
        let to = r
            .sender
            .as_ref()
            .map(|p| {
                if p.peer_id == app.me {
                    "you".to_owned()
                } else {
                    p.label.clone()
                }
            })
            .unwrap_or_else(|| "a message not here yet".to_owned());
        let quote = match &r.excerpt {
            Some(e) => format!("↪ {to}: {e}"),
            None => format!("↪ {to}"),
        };
        lines.push(Line::styled(format!("{pad}{}", fit(&quote, text_w)), dim));
    }
    if m.deleted {
        lines.push(Line::styled(
            format!("{pad}(deleted)"),
            dim.add_modifier(Modifier::ITALIC),
        ));
        return lines;
    }
    let body = match &m.body {
        MessageBody::Text { text } => text.clone(),
        MessageBody::File { file } => {
            let head = format!("📎 {} ({})", one_line(&file.name), human_bytes(file.size));
            lines.push(Line::from(format!("{pad}{}", fit(&head, text_w))));
            file.caption.clone()
        }
        _ => String::new(),
    };
    if !body.is_empty() {
        let wrapped = wrap(&body, text_w, MAX_MESSAGE_LINES);
        for l in wrapped.lines {
            lines.push(Line::from(format!("{pad}{l}")));
        }
        if wrapped.truncated {
            lines.push(Line::styled(
                format!("{pad}… (longer; `kith history` shows it all)"),
                dim,
            ));
        }
    }
    if !m.reactions.is_empty() {
        let list: Vec<String> = m
            .reactions
            .iter()
            .map(|r| {
                let mine = if r.by.contains(&app.me) { "*" } else { "" };
                format!("{} {}{mine}", one_line(&r.emoji), r.by.len())
            })
            .collect();
        lines.push(Line::styled(
            format!("{pad}{}", fit(&list.join("  "), text_w)),
            Style::default().fg(Color::Yellow),
        ));
    }
    if own && !m.read_by.is_empty() {
        let names: Vec<String> = m.read_by.iter().map(|p| p.label.clone()).collect();
        lines.push(Line::styled(
            format!(
                "{pad}{}",
                fit(&format!("read by {}", names.join(", ")), text_w)
            ),
            dim,
        ));
    }
    lines
}

fn draw_status(frame: &mut Frame, app: &App, area: Rect) {
    let w = area.width as usize;
    let line = if let Some(e) = &app.error {
        Line::styled(
            fit(&format!("error: {e}"), w),
            Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
        )
    } else {
        let (mark, state, color) = match app.connection {
            Connection::Connected => ("●", "connected", Color::Green),
            Connection::Connecting => ("○", "connecting…", Color::Yellow),
            Connection::Down => ("✗", NOT_REACHABLE, Color::Red),
        };
        let mut text = format!("{mark} {state}");
        if app.connection == Connection::Connected {
            let s = if app.peers == 1 { "" } else { "s" };
            text.push_str(&format!(" · {} peer{s}", app.peers));
        }
        if app.loading_older {
            text.push_str(" · loading earlier messages…");
        }
        if let Some(t) = app.typing_line() {
            text.push_str(" · ");
            text.push_str(&t);
        }
        Line::styled(fit(&text, w), Style::default().fg(color))
    };
    frame.render_widget(Paragraph::new(line), area);
}

fn draw_input(frame: &mut Frame, app: &App, area: Rect) {
    if app.open_is_left() {
        frame.render_widget(
            Paragraph::new(Line::styled(
                fit("(you left this group: read only)", area.width as usize),
                Style::default().fg(Color::DarkGray),
            )),
            area,
        );
        return;
    }
    let prefix = match &app.compose {
        Compose::New => "> ".to_owned(),
        Compose::Reply { to, .. } => format!("↪ {}> ", fit(to, 20)),
        Compose::Edit { .. } => "edit> ".to_owned(),
    };
    let prefix_w = width(&prefix);
    let avail = (area.width as usize).saturating_sub(prefix_w).max(1);
    let (text, cursor) = app.input.view(avail);
    frame.render_widget(
        Paragraph::new(Line::from(vec![
            Span::styled(prefix, Style::default().fg(Color::Cyan)),
            Span::raw(text),
        ])),
        area,
    );
    if !app.help && app.selected.is_none() {
        let x = area.x + (prefix_w + cursor).min(area.width.saturating_sub(1) as usize) as u16;
        frame.set_cursor_position((x, area.y));
    }
}

/// The footer's one-line help for what the keys do now.
pub fn footer_text(app: &App) -> String {
    if app.selected.is_some() {
        format!(
            "r reply · e edit · d delete · 1-6 react {} · Esc back",
            EMOJIS.concat()
        )
    } else if app.compose != Compose::New {
        "Enter send · Esc cancel · F1 help · Ctrl-C quit".to_owned()
    } else {
        "Enter send · ↑ select · Tab chats · F2 list · F1/? help · Ctrl-C quit".to_owned()
    }
}

fn draw_footer(frame: &mut Frame, app: &App, area: Rect) {
    frame.render_widget(
        Paragraph::new(Line::styled(
            fit(&footer_text(app), area.width as usize),
            Style::default().fg(Color::DarkGray),
        )),
        area,
    );
}

/// Every key, for the full help (F1 or `?`).
pub const HELP: &[(&str, &str)] = &[
    ("Enter", "send (on a selected message: reply)"),
    ("Tab, Ctrl-N / Ctrl-P", "next / previous chat"),
    ("F2", "show or hide the chats list"),
    ("Up / Down", "select a message (input empty)"),
    (
        "PageUp / PageDown",
        "scroll (past the oldest: load earlier)",
    ),
    ("r", "reply to the selected message"),
    ("e / d", "edit / delete your selected message"),
    ("1-6, +", "react 👍 ❤️ 😂 😮 😢 🎉 (again: take back)"),
    ("Esc", "cancel reply, edit or selection"),
    ("Left/Right, Home/End", "move in the input"),
    ("Ctrl-U", "clear the input"),
    ("Ctrl-C, Ctrl-D", "quit"),
];

fn draw_help(frame: &mut Frame, area: Rect) {
    let w = area.width.min(64);
    let h = area.height.min(HELP.len() as u16 + 4);
    let x = area.x + (area.width - w) / 2;
    let y = area.y + (area.height - h) / 2;
    let rect = Rect::new(x, y, w, h);
    frame.render_widget(Clear, rect);
    let block = Block::default()
        .borders(Borders::ALL)
        .title(" keys (times are UTC; any key closes) ");
    let inner = block.inner(rect);
    frame.render_widget(block, rect);
    let lines: Vec<Line> = HELP
        .iter()
        .map(|(k, what)| {
            Line::from(vec![
                Span::styled(
                    format!("{k:<22}"),
                    Style::default().add_modifier(Modifier::BOLD),
                ),
                Span::raw(*what),
            ])
        })
        .collect();
    frame.render_widget(Paragraph::new(lines), inner);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use kith_client::model::GroupSummary;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    fn screen(app: &App, w: u16, h: u16) -> Vec<String> {
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| draw(f, app)).unwrap();
        let buf = t.backend().buffer().clone();
        (0..h)
            .map(|y| {
                (0..w)
                    .map(|x| buf[(x, y)].symbol().to_owned())
                    .collect::<String>()
            })
            .collect()
    }

    fn app() -> App {
        let g: GroupSummary = serde_json::from_value(serde_json::json!({
            "id": "g1", "name": "fr\u{1b}[31miends", "epoch": 1, "member_count": 2
        }))
        .unwrap();
        let mut app = App::new("me".into(), &[g], Some("g1"));
        let mut m = MessageInfo::new(
            "m1".into(),
            "g1".into(),
            1,
            "ann".into(),
            (3_600_000 + 120_000, 0),
            MessageBody::Text {
                text: "hello \u{1b}[2J world ".repeat(30),
            },
        );
        m.sender_label = "Ann\u{202E}x".into();
        app.history_loaded("g1", vec![m]);
        app
    }

    #[test]
    fn the_screen_shows_list_messages_and_no_control_characters() {
        let app = app();
        let rows = screen(&app, 80, 20);
        let all = rows.join("\n");
        assert!(all.contains("▶ fr\u{FFFD}[31miends"), "{all}");
        assert!(all.contains("01:02 Ann\u{FFFD}x"), "{all}");
        assert!(all.contains("Enter send"), "{all}");
        assert!(!all.chars().any(|c| c.is_control() && c != '\n'), "{all}");
        // Narrow: no list, but the text still wraps into the width.
        let rows = screen(&app, 30, 20);
        assert!(!rows.join("\n").contains("chats"));
        assert!(rows.iter().any(|r| r.contains("hello")));
    }

    #[test]
    fn the_list_shows_unread_from_the_node_and_left_groups() {
        let groups: Vec<GroupSummary> = serde_json::from_value(serde_json::json!([
            {"id": "g1", "name": "open", "epoch": 1, "member_count": 2, "unread": 4},
            {"id": "g2", "name": "busy", "epoch": 1, "member_count": 2, "unread": 1000},
            {"id": "g3", "name": "few", "epoch": 1, "member_count": 2, "unread": 7},
            {"id": "g4", "name": "gone", "epoch": 1, "member_count": 1, "active": false},
        ]))
        .unwrap();
        let mut app = App::new("me".into(), &groups, Some("g4"));
        app.history_loaded("g4", Vec::new());
        let all = screen(&app, 80, 12).join("\n");
        assert!(all.contains("  open (4)"), "{all}");
        assert!(all.contains("  busy (999+)"), "{all}");
        assert!(all.contains("  few (7)"), "{all}");
        assert!(all.contains("▶ gone (left)"), "{all}");
        assert!(all.contains("gone · you left this group"), "{all}");
        assert!(all.contains("(you left this group: read only)"), "{all}");
    }

    #[test]
    fn a_huge_message_draws_quickly() {
        let mut app = app();
        let mut m = app.messages[0].clone();
        m.id = "big".into();
        m.body = MessageBody::Text {
            text: "y".repeat(100 * 1024),
        };
        app.history_loaded("g1", vec![m]);
        let start = std::time::Instant::now();
        let rows = screen(&app, 100, 40);
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
        assert!(rows.iter().any(|r| r.contains("yyyy")));
    }

    #[test]
    fn times_are_hours_and_minutes() {
        assert_eq!(hh_mm(0), "00:00");
        assert_eq!(
            hh_mm(86_400_000 + 13 * 3_600_000 + 5 * 60_000 + 999),
            "13:05"
        );
    }
}
