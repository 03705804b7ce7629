//! The full-screen client's I/O: the terminal (raw mode and the alternate screen, always
//! restored), keys and resizes, the node's event stream (retried with backoff while the
//! node is away), and the requests the state asks for, made one after another. Both go
//! through one [`Link`], so a node started again on a new port is followed by both.

use std::io::Write;
use std::time::Duration;

use crossterm::event::{Event, EventStream, KeyEventKind};
use crossterm::terminal::{EnterAlternateScreen, LeaveAlternateScreen};
use crossterm::{cursor, event, execute, terminal};
use futures::StreamExt;
use kith_client::model::{GroupSummary, MemberInfo, MessageInfo, StatusInfo};
use kith_client::{Client, ClientError, LiveEvent};
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use tokio::sync::mpsc;

use super::link::Link;
use super::state::{Action, App, HISTORY, NOT_REACHABLE, OLDER_PAGE};
use super::{draw, now_ms};
use crate::cli::CliError;

/// First wait before opening the event stream again; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest wait between attempts to reach the node.
const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// How often the status (peers, chats) is asked for, in ticks of one second.
const STATUS_EVERY_TICKS: u32 = 5;

/// What wakes the client besides keys.
#[derive(Debug)]
pub(super) enum Input {
    /// An event from the node.
    Live(LiveEvent),
    /// The event stream opened (true) or broke (false).
    Stream(bool),
    /// A request's answer.
    Answer(Answer),
}

/// A request's answer, for the state.
#[derive(Debug)]
pub(super) enum Answer {
    History(String, Vec<MessageInfo>),
    /// A page of older messages: group, the message it is before, the page.
    Older(String, String, Vec<MessageInfo>),
    Groups(Vec<GroupSummary>),
    Members(String, Vec<MemberInfo>),
    Status(Box<StatusInfo>),
    Message(Box<MessageInfo>),
    Failed(String),
}

/// The error line for a failed request.
pub(super) fn error_line(e: &ClientError) -> String {
    match e {
        ClientError::NotRunning | ClientError::StreamEnded => NOT_REACHABLE.to_owned(),
        e => e.to_string().replace('\n', " "),
    }
}

/// Whether an answer says the node could not be reached (worth re-reading its address).
fn unreachable(answers: &[Answer]) -> bool {
    answers
        .iter()
        .any(|a| matches!(a, Answer::Failed(line) if line == NOT_REACHABLE))
}

/// Follows the node's event stream (of one group or all), opening it again with backoff
/// whenever it breaks (re-reading the node's address each time), until the receiver is
/// gone.
pub(super) async fn pump(link: Link, group: Option<String>, tx: mpsc::Sender<Input>) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        if let Ok(mut stream) = link.client().events(group.as_deref()).await {
            backoff = FIRST_BACKOFF;
            if tx.send(Input::Stream(true)).await.is_err() {
                return;
            }
            while let Ok(Some(event)) = stream.next().await {
                if tx.send(Input::Live(event)).await.is_err() {
                    return;
                }
            }
        }
        if tx.send(Input::Stream(false)).await.is_err() {
            return;
        }
        // Started again on another port: try there at once.
        if link.reread() {
            continue;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Makes the requests the state asked for, in order, sending the answers back. A request
/// the node was not there for is made once more if its address changed (refused
/// connections never reached it, so nothing is done twice).
async fn worker(link: Link, mut actions: mpsc::Receiver<Action>, tx: mpsc::Sender<Input>) {
    while let Some(action) = actions.recv().await {
        let mut answers = perform(&link.client(), action.clone()).await;
        if unreachable(&answers) && link.reread() {
            answers = perform(&link.client(), action).await;
        }
        for a in answers {
            if tx.send(Input::Answer(a)).await.is_err() {
                return;
            }
        }
    }
}

async fn perform(client: &Client, action: Action) -> Vec<Answer> {
    let one = |r: Result<MessageInfo, ClientError>| match r {
        Ok(m) => vec![Answer::Message(Box::new(m))],
        Err(e) => vec![Answer::Failed(error_line(&e))],
    };
    match action {
        Action::Open { group } => {
            let mut out = Vec::new();
            match client.history(&group, Some(HISTORY)).await {
                Ok(h) => out.push(Answer::History(group.clone(), h)),
                Err(e) => out.push(Answer::Failed(error_line(&e))),
            }
            if let Ok(m) = client.members(&group).await {
                out.push(Answer::Members(group, m));
            }
            out
        }
        Action::Older { group, before } => {
            match client
                .history_before(&group, Some(OLDER_PAGE), Some(&before))
                .await
            {
                Ok(page) => vec![Answer::Older(group, before, page)],
                Err(e) => vec![Answer::Failed(error_line(&e))],
            }
        }
        Action::Refresh => {
            let status = match client.status().await {
                Ok(s) => Answer::Status(Box::new(s)),
                Err(e) => return vec![Answer::Failed(error_line(&e))],
            };
            let mut out = vec![status];
            out.extend(groups(client).await);
            out
        }
        Action::Groups => groups(client).await.into_iter().collect(),
        Action::Send {
            group,
            text,
            reply_to,
        } => one(client.reply(&group, &text, reply_to.as_deref()).await),
        Action::Edit { group, id, text } => one(client.edit(&group, &id, &text).await),
        Action::Delete { group, id } => one(client.delete_message(&group, &id).await),
        Action::React {
            group,
            id,
            emoji,
            on,
        } => one(client.react(&group, &id, &emoji, on).await),
        Action::MarkRead { group, up_to } => match client.mark_read(&group, Some(&up_to)).await {
            Ok(_) => Vec::new(),
            Err(e) => vec![Answer::Failed(error_line(&e))],
        },
        // A lost typing notice does not matter.
        Action::Typing { group } => {
            let _ = client.typing(&group).await;
            Vec::new()
        }
        Action::Quit => Vec::new(),
    }
}

/// The chats list with unread counts.
async fn groups(client: &Client) -> Option<Answer> {
    Some(match client.groups().await {
        Ok(g) => Answer::Groups(g),
        Err(e) => Answer::Failed(error_line(&e)),
    })
}

/// Puts the terminal back as it was: raw mode off, alternate screen left, cursor shown.
/// Safe to call more than once.
fn restore_terminal() {
    let _ = terminal::disable_raw_mode();
    let mut out = std::io::stdout();
    let _ = execute!(
        out,
        event::DisableBracketedPaste,
        LeaveAlternateScreen,
        cursor::Show
    );
    let _ = out.flush();
}

/// The terminal in full-screen mode while this lives; restored when it is dropped (on
/// quit and on error) and by the panic hook on a panic.
struct TerminalGuard;

impl TerminalGuard {
    fn enter() -> std::io::Result<TerminalGuard> {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            previous(info);
        }));
        terminal::enable_raw_mode()?;
        let guard = TerminalGuard;
        execute!(
            std::io::stdout(),
            EnterAlternateScreen,
            event::EnableBracketedPaste
        )?;
        Ok(guard)
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Runs the full-screen client until the user quits.
pub async fn run(link: Link, group: Option<&str>) -> Result<(), CliError> {
    // Everything that can fail with a clear line fails before the screen changes.
    let client = link.client();
    let status = client.status().await?;
    let groups = client.groups().await?;
    let open = match group {
        Some(g) => Some(client.group(g).await?.id),
        None => None,
    };
    let mut app = App::new(status.peer_id.clone(), &groups, open.as_deref());
    app.peers = status.connected_peers;

    let (tx, mut rx) = mpsc::channel::<Input>(256);
    let (actions_tx, actions_rx) = mpsc::channel::<Action>(256);
    let pump_task = tokio::spawn(pump(link.clone(), None, tx.clone()));
    let worker_task = tokio::spawn(worker(link, actions_rx, tx));

    let guard = TerminalGuard::enter()?;
    let result = event_loop(&mut app, &mut rx, &actions_tx).await;
    drop(guard);
    pump_task.abort();
    worker_task.abort();
    result
}

/// Sleeps until `at` (forever without one; the `select!` guard keeps that from mattering).
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn event_loop(
    app: &mut App,
    rx: &mut mpsc::Receiver<Input>,
    actions: &mpsc::Sender<Action>,
) -> Result<(), CliError> {
    // No `clear()`: it asks the terminal where the cursor is, and the alternate screen
    // starts blank anyway.
    let mut terminal = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
    let mut keys = EventStream::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut ticks: u32 = 0;
    let mut pending = app.start();
    loop {
        for action in pending.drain(..) {
            if action == Action::Quit {
                return Ok(());
            }
            // A full queue drops the request (the user can do it again) rather than freeze.
            if actions.try_send(action).is_err() {
                app.failed("too many requests waiting for the node".to_owned());
            }
        }
        terminal.draw(|f| draw::draw(f, app))?;
        let now = now_ms();
        // The chats list is asked for again a moment after the events that change it.
        let refetch = app.groups_due().map(|due| {
            tokio::time::Instant::now() + Duration::from_millis(due.saturating_sub(now))
        });
        pending = tokio::select! {
            key = keys.next() => match key {
                Some(Ok(Event::Key(k))) if k.kind != KeyEventKind::Release => app.key(k, now),
                Some(Ok(Event::Paste(text))) => app.paste(&text, now),
                // A resize (or anything else) only needs the redraw at the loop's top.
                Some(Ok(_)) => Vec::new(),
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(()),
            },
            Some(input) = rx.recv() => match input {
                Input::Live(LiveEvent::Event(e)) => app.apply(e, now),
                Input::Live(LiveEvent::Lagged(_)) => app.lagged(),
                Input::Stream(up) => app.connection_changed(up),
                Input::Answer(Answer::History(g, h)) => app.history_loaded(&g, h),
                Input::Answer(Answer::Older(g, before, page)) => {
                    app.older_loaded(&g, &before, page);
                    Vec::new()
                }
                Input::Answer(Answer::Groups(groups)) => {
                    app.set_groups(&groups);
                    Vec::new()
                }
                Input::Answer(Answer::Members(g, m)) => {
                    app.members_loaded(&g, &m);
                    Vec::new()
                }
                Input::Answer(Answer::Status(s)) => {
                    app.status_loaded(&s);
                    Vec::new()
                }
                Input::Answer(Answer::Message(m)) => {
                    app.message_updated(*m);
                    Vec::new()
                }
                Input::Answer(Answer::Failed(e)) => {
                    app.failed(e);
                    Vec::new()
                }
            },
            () = sleep_until(refetch), if refetch.is_some() => app.due(now_ms()),
            _ = tick.tick() => {
                app.tick(now);
                ticks = ticks.wrapping_add(1);
                if ticks.is_multiple_of(STATUS_EVERY_TICKS) {
                    vec![Action::Refresh]
                } else {
                    Vec::new()
                }
            }
        };
    }
}
