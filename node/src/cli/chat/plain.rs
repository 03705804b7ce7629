//! The plain mode of `kith chat`: lines in, lines out, for pipes, scripts and terminals
//! that cannot take the full screen. Every line written is made safe first: it may go to a
//! real terminal.

use std::collections::{HashMap, HashSet};
use std::io::Write;

use kith_client::model::{GroupInfo, MessageBody, MessageInfo, NodeEvent};
use kith_client::text::{human_bytes, short_peer};
use kith_client::{Client, ClientError, LiveEvent};
use tokio::sync::mpsc;

use super::ChatArgs;
use super::draw::hh_mm;
use super::link::Link;
use super::run::{Input, error_line, pump};
use super::state::NOT_REACHABLE;
use super::text::one_line;
use crate::cli::CliError;

/// Names of a group's members as shown, by PeerId; this node is "you".
fn labels(group: &GroupInfo) -> HashMap<String, String> {
    group
        .members
        .iter()
        .map(|m| {
            let name = if m.is_self {
                "you".to_owned()
            } else if !m.label.is_empty() {
                m.label.clone()
            } else {
                short_peer(&m.peer_id)
            };
            (m.peer_id.clone(), name)
        })
        .collect()
}

/// One message as a line, `HH:MM name: text`, or `None` for what is not a message (membership
/// notes, reactions). Safe for a terminal: no control characters, no bidi controls.
pub fn line(m: &MessageInfo, labels: &HashMap<String, String>) -> Option<String> {
    let name = labels.get(&m.sender).cloned().unwrap_or_else(|| {
        if m.sender_label.is_empty() {
            short_peer(&m.sender)
        } else {
            m.sender_label.clone()
        }
    });
    let text = if m.deleted {
        "(deleted)".to_owned()
    } else {
        match &m.body {
            MessageBody::Text { text } => text.clone(),
            MessageBody::File { file } => {
                let caption = if file.caption.is_empty() {
                    String::new()
                } else {
                    format!(" {}", file.caption)
                };
                format!("[file {} ({})]{caption}", file.name, human_bytes(file.size))
            }
            _ => return None,
        }
    };
    let edited = if m.edited_at_ms.is_some() && !m.deleted {
        " (edited)"
    } else {
        ""
    };
    Some(format!(
        "{} {}: {}{edited}",
        hh_mm(m.sent_at_ms),
        one_line(&name),
        one_line(&text)
    ))
}

/// Writes a line to stdout; a closed pipe ends the chat quietly.
fn print(line: &str) -> Result<bool, CliError> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Writes a note to stderr (never fails the chat).
fn note(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// The group the plain mode talks in: the one named, or the only one.
async fn pick_group(client: &Client, group: Option<&str>) -> Result<GroupInfo, CliError> {
    if let Some(g) = group {
        return Ok(client.group(g).await?);
    }
    let groups = client.groups().await?;
    match groups.as_slice() {
        [one] => Ok(client.group(&one.id).await?),
        [] => Err(CliError::Local(
            "this node is in no group yet: create one (`kith group create NAME`) or join one (`kith join LINK`)".to_owned(),
        )),
        many => {
            let names: Vec<String> = many.iter().take(5).map(|g| one_line(&g.name)).collect();
            let more = if many.len() > 5 { ", …" } else { "" };
            Err(CliError::Local(format!(
                "this node is in {} groups: name one, e.g. `kith chat '{}'` ({}{more})",
                many.len(),
                names[0],
                names.join(", ")
            )))
        }
    }
}

/// Lines of stdin, read by a thread of their own (a blocking read there never holds up the
/// runtime, nor the exit); `Ok(None)` at EOF.
fn stdin_lines() -> mpsc::Receiver<std::io::Result<Option<String>>> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        use std::io::BufRead;
        let stdin = std::io::stdin();
        let mut lines = stdin.lock().lines();
        loop {
            let item = lines.next().transpose();
            let end = !matches!(item, Ok(Some(_)));
            if tx.blocking_send(item).is_err() || end {
                return;
            }
        }
    });
    rx
}

/// Runs the plain mode until stdin ends.
pub async fn run(link: &Link, args: &ChatArgs) -> Result<(), CliError> {
    let client = &link.client();
    let group = pick_group(client, args.group.as_deref()).await?;
    let mut labels = labels(&group);
    // Listen first, so nothing sent between the history and the stream is missed.
    let (tx, mut rx) = mpsc::channel::<Input>(256);
    let pump_task = tokio::spawn(pump(link.clone(), Some(group.id.clone()), tx));
    match rx.recv().await {
        Some(Input::Stream(true)) => {}
        _ => {
            pump_task.abort();
            return Err(CliError::Local(NOT_REACHABLE.to_owned()));
        }
    }
    let mut seen: HashSet<String> = HashSet::new();
    if args.last > 0 {
        for m in client.history(&group.id, Some(args.last)).await? {
            seen.insert(m.id.clone());
            if let Some(l) = line(&m, &labels)
                && !print(&l)?
            {
                pump_task.abort();
                return Ok(());
            }
        }
    }
    let mut stdin = stdin_lines();
    let mut was_down = false;
    let result = loop {
        tokio::select! {
            read = stdin.recv() => match read.unwrap_or(Ok(None)) {
                Ok(Some(text)) if text.trim().is_empty() => {}
                Ok(Some(text)) => {
                    let mut sent = link.client().send(&group.id, &text).await;
                    // Refused: the node may listen elsewhere now (nothing was sent).
                    if matches!(sent, Err(ClientError::NotRunning)) && link.reread() {
                        sent = link.client().send(&group.id, &text).await;
                    }
                    if let Err(e) = sent {
                        note(&format!("error: {}", error_line(&e)));
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e.into()),
            },
            Some(input) = rx.recv() => match input {
                Input::Live(LiveEvent::Event(NodeEvent::Message(m))) => {
                    if seen.remove(&m.id) {
                        continue;
                    }
                    if let Some(l) = line(&m, &labels)
                        && !print(&l)?
                    {
                        break Ok(());
                    }
                }
                Input::Live(LiveEvent::Event(NodeEvent::ProfileUpdated { profile, .. })) => {
                    if labels.get(&profile.peer_id).map(String::as_str) != Some("you") {
                        labels.insert(profile.peer_id, profile.label);
                    }
                }
                Input::Live(LiveEvent::Lagged(missed)) => {
                    note(&format!("(fell behind: {missed} events were skipped; see `kith history`)"));
                }
                Input::Live(_) | Input::Answer(_) => {}
                Input::Stream(false) if !was_down => {
                    was_down = true;
                    note(NOT_REACHABLE);
                }
                Input::Stream(false) => {}
                Input::Stream(true) => {
                    if was_down {
                        note("(connected again)");
                    }
                    was_down = false;
                }
            },
        }
    };
    pump_task.abort();
    result
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_safe_and_short() {
        let mut m = MessageInfo::new(
            "m".into(),
            "g".into(),
            1,
            "12D3KooWabcdefgh".into(),
            (3_600_000, 0),
            MessageBody::Text {
                text: "hi\x1b[2J\nthere\u{202E}".into(),
            },
        );
        let labels = HashMap::new();
        assert_eq!(
            line(&m, &labels).unwrap(),
            "01:00 abcdefgh: hi\u{FFFD}[2J there\u{FFFD}"
        );
        m.sender_label = "Eve\x07".into();
        m.edited_at_ms = Some(1);
        assert_eq!(
            line(&m, &labels).unwrap(),
            "01:00 Eve\u{FFFD}: hi\u{FFFD}[2J there\u{FFFD} (edited)"
        );
        m.body = MessageBody::MembersAdded { members: vec![] };
        assert_eq!(line(&m, &labels), None);
    }
}
