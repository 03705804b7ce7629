//! The chat client's state and its logic, with no terminal and no network: keys and node
//! events go in, [`Action`]s (requests for the I/O layer to make) come out. Drawing reads
//! this state (`draw.rs`); `run.rs` feeds it.

use std::cell::Cell;
use std::collections::HashMap;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use kith_client::model::{
    GroupSummary, MAX_UNREAD, MemberInfo, MessageBody, MessageInfo, NodeEvent, StatusInfo,
};

use super::input::InputLine;

/// The reactions offered by key (`1` to `6`; `+` is the first).
pub const EMOJIS: [&str; 6] = ["👍", "❤️", "😂", "😮", "😢", "🎉"];

/// How long a typing notice is shown.
pub const TYPING_SHOWN_MS: u64 = 5_000;

/// How many messages PageUp/PageDown move.
const PAGE: usize = 5;

/// How many history entries opening a chat loads.
pub const HISTORY: u64 = 200;

/// How many history entries one page further back loads.
pub const OLDER_PAGE: u64 = 100;

/// How long after an event that changes the chats list (a message, a read mark, a
/// membership change) the list is asked for again; the events in between share one request.
pub const GROUPS_DEBOUNCE_MS: u64 = 300;

/// The line for writing in a group this node is no longer in.
pub const LEFT_LINE: &str =
    "you are no longer in this group: its messages can be read, not answered";

/// A request the state wants made to the node. The I/O layer makes it and reports the
/// answer back ([`App::history_loaded`], [`App::message_updated`], [`App::failed`], …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Load the history and members of a group (opening it, or catching up).
    Open {
        /// Group id.
        group: String,
    },
    /// Load the page of history before a message (scrolled past the oldest loaded).
    Older {
        /// Group id.
        group: String,
        /// The oldest message loaded.
        before: String,
    },
    /// Load the node's status and the chats list.
    Refresh,
    /// Load the chats list (unread counts, who is still in which group).
    Groups,
    /// Send a text, possibly as a reply.
    Send {
        /// Group id.
        group: String,
        /// The text.
        text: String,
        /// The message it answers.
        reply_to: Option<String>,
    },
    /// Replace the text of one's own message.
    Edit {
        /// Group id.
        group: String,
        /// Message id.
        id: String,
        /// The new text.
        text: String,
    },
    /// Delete one's own message.
    Delete {
        /// Group id.
        group: String,
        /// Message id.
        id: String,
    },
    /// Put (`on`) or take back a reaction.
    React {
        /// Group id.
        group: String,
        /// Message id.
        id: String,
        /// The emoji.
        emoji: String,
        /// Put or take back.
        on: bool,
    },
    /// Mark the group read up to a message.
    MarkRead {
        /// Group id.
        group: String,
        /// Message id.
        up_to: String,
    },
    /// Tell the group this user is typing.
    Typing {
        /// Group id.
        group: String,
    },
    /// Leave the client.
    Quit,
}

/// A chat in the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chat {
    /// Group id.
    pub id: String,
    /// Its name as the node shows it (a direct chat: the other person).
    pub name: String,
    /// Others' messages after the read mark and this node's own last message (from the
    /// node, at most [`MAX_UNREAD`]); 0 for the open chat.
    pub unread: u64,
    /// Whether this node is still a member (a group left or removed from is read-only).
    pub active: bool,
}

impl Chat {
    /// The unread count as shown: none, `N`, or `999+` from [`MAX_UNREAD`] on.
    pub fn unread_label(&self) -> Option<String> {
        match self.unread {
            0 => None,
            n if n >= MAX_UNREAD => Some(format!("{}+", MAX_UNREAD - 1)),
            n => Some(n.to_string()),
        }
    }
}

/// What Enter does with the input line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compose {
    /// Sends a new message.
    New,
    /// Sends a reply to this message.
    Reply {
        /// Message id.
        id: String,
        /// Who wrote it (as shown).
        to: String,
    },
    /// Replaces the text of this own message.
    Edit {
        /// Message id.
        id: String,
    },
}

/// The connection to the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connection {
    /// The event stream is open.
    Connected,
    /// Connecting (at start).
    Connecting,
    /// The node went away; the stream is retried.
    Down,
}

/// The line shown for the node going away.
pub const NOT_REACHABLE: &str = "node not reachable: is `kith run` running?";

/// Everything the chat client shows and remembers.
#[derive(Debug, Clone)]
pub struct App {
    /// This node's PeerId.
    pub me: String,
    /// The chats, in the node's order.
    pub chats: Vec<Chat>,
    /// Index of the open chat in `chats` (none while there are no chats).
    pub open: Option<usize>,
    /// The open chat's messages, oldest first.
    pub messages: Vec<MessageInfo>,
    /// Whether the open chat's history has been loaded.
    pub loaded: bool,
    /// Names to show, by PeerId (from members and profiles).
    pub names: HashMap<String, String>,
    /// Members of the open chat.
    pub member_count: usize,
    /// The input line.
    pub input: InputLine,
    /// What Enter does.
    pub compose: Compose,
    /// The selected message (an index into `messages`).
    pub selected: Option<usize>,
    /// Messages scrolled back from the newest (0: the newest is at the bottom).
    pub scroll: usize,
    /// The node's connection state.
    pub connection: Connection,
    /// Peers the node is connected to.
    pub peers: usize,
    /// The last failure, shown in the status line until the next action.
    pub error: Option<String>,
    /// Who is typing in the open chat, and until when (ms).
    pub typing: Vec<(String, u64)>,
    /// F2 flipped the chats list (hidden on a wide terminal, shown on a narrow one).
    pub show_list: bool,
    /// The full help shown.
    pub help: bool,
    /// Whether the node may hold messages older than the oldest loaded.
    pub has_older: bool,
    /// A page of older messages was asked for and has not arrived.
    pub loading_older: bool,
    /// Whether the last drawing showed the oldest loaded message (set by `draw`).
    pub oldest_drawn: Cell<bool>,
    /// When the chats list is to be asked for again (ms), after events that change it.
    groups_due: Option<u64>,
    /// When a typing notice was last sent (ms).
    last_typing_ms: u64,
}

impl App {
    /// A client of the node `me`, with `chats`, opening `open` (a group id) if given.
    pub fn new(me: String, groups: &[GroupSummary], open: Option<&str>) -> App {
        let mut app = App {
            me,
            chats: Vec::new(),
            open: None,
            messages: Vec::new(),
            loaded: false,
            names: HashMap::new(),
            member_count: 0,
            input: InputLine::default(),
            compose: Compose::New,
            selected: None,
            scroll: 0,
            connection: Connection::Connecting,
            peers: 0,
            error: None,
            typing: Vec::new(),
            show_list: false,
            help: false,
            has_older: false,
            loading_older: false,
            oldest_drawn: Cell::new(false),
            groups_due: None,
            last_typing_ms: 0,
        };
        app.set_groups(groups);
        app.open = open
            .and_then(|id| app.chats.iter().position(|c| c.id == id))
            .or(if app.chats.is_empty() { None } else { Some(0) });
        app
    }

    /// The open chat.
    pub fn open_chat(&self) -> Option<&Chat> {
        self.open.and_then(|i| self.chats.get(i))
    }

    fn open_id(&self) -> Option<String> {
        self.open_chat().map(|c| c.id.clone())
    }

    /// The actions to run at start (load the open chat).
    pub fn start(&self) -> Vec<Action> {
        self.open_id()
            .map(|group| vec![Action::Open { group }])
            .unwrap_or_default()
    }

    /// Replaces the list of chats with the node's (`GET /v1/groups`), keeping the open chat
    /// open. The open chat shows no unread count: it is being read.
    pub fn set_groups(&mut self, groups: &[GroupSummary]) {
        let open = self.open_id();
        self.chats = groups
            .iter()
            .map(|g| Chat {
                id: g.id.clone(),
                name: g
                    .direct
                    .as_ref()
                    .map(|p| p.label.clone())
                    .unwrap_or_else(|| g.name.clone()),
                unread: if open.as_deref() == Some(g.id.as_str()) {
                    0
                } else {
                    g.unread.min(MAX_UNREAD)
                },
                active: g.active,
            })
            .collect();
        self.open = open
            .and_then(|id| self.chats.iter().position(|c| c.id == id))
            .or(if self.chats.is_empty() { None } else { Some(0) });
    }

    /// The node's status arrived (the chats list comes from [`App::set_groups`]).
    pub fn status_loaded(&mut self, status: &StatusInfo) {
        self.peers = status.connected_peers;
    }

    /// Whether the open chat is one this node is no longer in.
    pub fn open_is_left(&self) -> bool {
        self.open_chat().is_some_and(|c| !c.active)
    }

    /// When the chats list is due to be asked for again (ms), if it is.
    pub fn groups_due(&self) -> Option<u64> {
        self.groups_due
    }

    /// Asks for the chats list once it is due.
    pub fn due(&mut self, now_ms: u64) -> Vec<Action> {
        match self.groups_due {
            Some(due) if due <= now_ms => {
                self.groups_due = None;
                vec![Action::Groups]
            }
            _ => Vec::new(),
        }
    }

    /// Something changed the chats list: ask for it again shortly (once for a burst).
    fn groups_changed(&mut self, now_ms: u64) {
        if self.groups_due.is_none() {
            self.groups_due = Some(now_ms + GROUPS_DEBOUNCE_MS);
        }
    }

    /// The newest history of `group` arrived (`HISTORY` entries at most); shown if it is the
    /// open chat, which is then read. Older pages loaded before it stay in front of it, and
    /// the selection stays on the same message.
    pub fn history_loaded(&mut self, group: &str, messages: Vec<MessageInfo>) -> Vec<Action> {
        if self.open_id().as_deref() != Some(group) {
            return Vec::new();
        }
        for m in &messages {
            self.learn_name(m);
        }
        let full = messages.len() as u64 >= HISTORY;
        let new: Vec<MessageInfo> = messages.into_iter().filter(shown_in_list).collect();
        let selected = self.selected_message().map(|m| m.id.clone());
        // Where the new newest page starts among what is loaded: what is before it stays.
        let kept = new
            .first()
            .and_then(|first| self.messages.iter().position(|m| m.id == first.id))
            .filter(|&j| j > 0);
        match kept {
            Some(j) => {
                self.messages.truncate(j);
                self.messages.extend(new);
            }
            None => {
                self.messages = new;
                self.has_older = full;
            }
        }
        self.loaded = true;
        self.selected = selected.and_then(|id| self.messages.iter().position(|m| m.id == id));
        self.scroll = self.scroll.min(self.messages.len().saturating_sub(1));
        self.read_newest()
    }

    /// Asks for the page before the oldest loaded message, unless it is already asked
    /// for or the start of the chat is loaded.
    fn load_older(&mut self) -> Vec<Action> {
        if !self.loaded || !self.has_older || self.loading_older {
            return Vec::new();
        }
        let (Some(group), Some(first)) = (self.open_id(), self.messages.first()) else {
            return Vec::new();
        };
        self.loading_older = true;
        vec![Action::Older {
            group,
            before: first.id.clone(),
        }]
    }

    /// A page of `group`'s history before message `before` arrived: put in front, the view
    /// staying on the messages it showed. Dropped if the chat changed in between.
    pub fn older_loaded(&mut self, group: &str, before: &str, page: Vec<MessageInfo>) {
        if self.open_id().as_deref() != Some(group) {
            return;
        }
        self.loading_older = false;
        if self.messages.first().map(|m| m.id.as_str()) != Some(before) {
            return;
        }
        if (page.len() as u64) < OLDER_PAGE {
            self.has_older = false;
        }
        for m in &page {
            self.learn_name(m);
        }
        let older: Vec<MessageInfo> = page
            .into_iter()
            .filter(|m| shown_in_list(m) && !self.messages.iter().any(|o| o.id == m.id))
            .collect();
        let k = older.len();
        if k == 0 {
            return;
        }
        // `scroll` counts from the newest, so the view stays; the selection moves with
        // its message.
        self.messages.splice(0..0, older);
        self.selected = self.selected.map(|i| i + k);
    }

    /// The members of `group` arrived.
    pub fn members_loaded(&mut self, group: &str, members: &[MemberInfo]) {
        for m in members {
            if !m.label.is_empty() {
                self.names.insert(m.peer_id.clone(), m.label.clone());
            }
        }
        if self.open_id().as_deref() == Some(group) {
            self.member_count = members.len();
        }
    }

    /// A request failed: its one-line error goes to the status line.
    pub fn failed(&mut self, error: String) {
        self.error = Some(error);
    }

    /// The node answered a request with a message as it is now (sent, edited, reacted).
    pub fn message_updated(&mut self, m: MessageInfo) {
        self.error = None;
        self.upsert(m);
    }

    /// The event stream opened (`true`) or broke (`false`). On reopening, what was missed
    /// is loaded again.
    pub fn connection_changed(&mut self, up: bool) -> Vec<Action> {
        if up {
            let was_down = self.connection == Connection::Down;
            self.connection = Connection::Connected;
            if was_down {
                self.error = None;
                let mut actions = vec![Action::Refresh];
                actions.extend(self.start());
                return actions;
            }
        } else {
            self.connection = Connection::Down;
        }
        Vec::new()
    }

    /// The event stream skipped events: load the open chat again.
    pub fn lagged(&mut self) -> Vec<Action> {
        let mut actions = vec![Action::Refresh];
        actions.extend(self.start());
        actions
    }

    /// Folds a live event into the state.
    pub fn apply(&mut self, event: NodeEvent, now_ms: u64) -> Vec<Action> {
        let open = self.open_id();
        let here = open.as_deref() == Some(event.group());
        if matches!(
            event,
            NodeEvent::Message(_)
                | NodeEvent::Read { .. }
                | NodeEvent::GroupJoined(_)
                | NodeEvent::EpochChanged { .. }
                | NodeEvent::HistorySynced { .. }
        ) {
            self.groups_changed(now_ms);
        }
        match event {
            NodeEvent::Message(m) => {
                self.learn_name(&m);
                if !shown_in_list(&m) {
                    return Vec::new();
                }
                if !here {
                    let from_other = m.sender != self.me;
                    if let Some(c) = self.chats.iter_mut().find(|c| c.id == m.group)
                        && from_other
                        && counts_as_unread(&m.body)
                    {
                        // Shown at once; the node's count follows shortly.
                        c.unread = (c.unread + 1).min(MAX_UNREAD);
                    }
                    return Vec::new();
                }
                // A message from someone ends their typing notice.
                self.typing
                    .retain(|(who, _)| Some(who) != self.names.get(&m.sender));
                let from_other = m.sender != self.me;
                let id = m.id.clone();
                let group = m.group.clone();
                self.upsert(*m);
                if from_other && self.scroll == 0 {
                    return vec![Action::MarkRead { group, up_to: id }];
                }
                Vec::new()
            }
            NodeEvent::MessageChanged {
                message: Some(m), ..
            } if here => {
                self.upsert(*m);
                Vec::new()
            }
            NodeEvent::EpochChanged { member_count, .. } if here => {
                self.member_count = member_count;
                open.map(|group| vec![Action::Open { group }])
                    .unwrap_or_default()
            }
            NodeEvent::ProfileUpdated { profile, .. } => {
                self.names.insert(profile.peer_id.clone(), profile.label);
                if here { self.start() } else { Vec::new() }
            }
            // Read receipts change `read_by` on own messages: load them again.
            NodeEvent::Read { peer, .. } if here && peer != self.me => self.start(),
            NodeEvent::Typing { peer, .. } if here && peer.peer_id != self.me => {
                self.typing.retain(|(who, _)| *who != peer.label);
                self.typing.push((peer.label, now_ms + TYPING_SHOWN_MS));
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    /// Drops typing notices that have expired; true if any did.
    pub fn tick(&mut self, now_ms: u64) -> bool {
        let before = self.typing.len();
        self.typing.retain(|(_, until)| *until > now_ms);
        before != self.typing.len()
    }

    /// Who is typing in the open chat, for the status line.
    pub fn typing_line(&self) -> Option<String> {
        match self.typing.as_slice() {
            [] => None,
            [(one, _)] => Some(format!("{one} is typing…")),
            many => Some(format!(
                "{} are typing…",
                many.iter()
                    .map(|(w, _)| w.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    /// The name to show for a PeerId.
    pub fn name_of(&self, peer: &str) -> String {
        if peer == self.me {
            return "you".to_owned();
        }
        self.names
            .get(peer)
            .cloned()
            .unwrap_or_else(|| kith_client::text::short_peer(peer))
    }

    /// The name to show for a message's sender.
    pub fn sender_of(&self, m: &MessageInfo) -> String {
        if m.sender == self.me {
            return "you".to_owned();
        }
        if let Some(n) = self.names.get(&m.sender) {
            return n.clone();
        }
        if !m.sender_label.is_empty() {
            return m.sender_label.clone();
        }
        kith_client::text::short_peer(&m.sender)
    }

    fn learn_name(&mut self, m: &MessageInfo) {
        if !m.sender_label.is_empty() && !self.names.contains_key(&m.sender) {
            self.names.insert(m.sender.clone(), m.sender_label.clone());
        }
    }

    /// Inserts a message of the open chat, or replaces it if it is there.
    fn upsert(&mut self, m: MessageInfo) {
        if self.open_id().as_deref() != Some(m.group.as_str()) || !shown_in_list(&m) {
            return;
        }
        if let Some(old) = self.messages.iter_mut().find(|o| o.id == m.id) {
            *old = m;
        } else {
            self.messages.push(m);
            // Scrolled back: stay on the same messages.
            if self.scroll > 0 {
                self.scroll += 1;
            }
        }
    }

    /// Marks the open chat read up to its newest message from someone else.
    fn read_newest(&self) -> Vec<Action> {
        let Some(group) = self.open_id() else {
            return Vec::new();
        };
        self.messages
            .iter()
            .rev()
            .find(|m| m.sender != self.me && counts_as_unread(&m.body))
            .map(|m| {
                vec![Action::MarkRead {
                    group,
                    up_to: m.id.clone(),
                }]
            })
            .unwrap_or_default()
    }

    fn switch(&mut self, forward: bool) -> Vec<Action> {
        let n = self.chats.len();
        let Some(i) = self.open else {
            return Vec::new();
        };
        if n < 2 {
            return Vec::new();
        }
        let next = if forward {
            (i + 1) % n
        } else {
            (i + n - 1) % n
        };
        self.open_chat_at(next)
    }

    /// Opens the chat at `index` in the list.
    pub fn open_chat_at(&mut self, index: usize) -> Vec<Action> {
        let Some(chat) = self.chats.get_mut(index) else {
            return Vec::new();
        };
        chat.unread = 0;
        let group = chat.id.clone();
        self.open = Some(index);
        self.messages.clear();
        self.loaded = false;
        self.has_older = false;
        self.loading_older = false;
        self.oldest_drawn.set(false);
        self.selected = None;
        self.scroll = 0;
        self.typing.clear();
        self.member_count = 0;
        self.compose = Compose::New;
        self.input.clear();
        vec![Action::Open { group }]
    }

    /// The selected message.
    pub fn selected_message(&self) -> Option<&MessageInfo> {
        self.selected.and_then(|i| self.messages.get(i))
    }

    fn select_up(&mut self) {
        let n = self.messages.len();
        if n == 0 {
            return;
        }
        self.selected = Some(match self.selected {
            None => n - 1 - self.scroll.min(n - 1),
            Some(i) => i.saturating_sub(1),
        });
        self.follow_selection();
    }

    /// Up on empty input: select the message before; at the oldest, load the page before.
    fn up(&mut self) -> Vec<Action> {
        self.select_up();
        if self.selected == Some(0) {
            self.load_older()
        } else {
            Vec::new()
        }
    }

    fn select_down(&mut self) {
        let n = self.messages.len();
        match self.selected {
            Some(i) if i + 1 < n => self.selected = Some(i + 1),
            Some(_) => {
                self.selected = None;
                self.scroll = 0;
            }
            None => {}
        }
        self.follow_selection();
    }

    /// Keeps the selected message at or above the bottom of the view.
    fn follow_selection(&mut self) {
        if let Some(i) = self.selected {
            let bottom = self.messages.len().saturating_sub(1 + self.scroll);
            if i > bottom {
                self.scroll = self.messages.len() - 1 - i;
            }
        }
    }

    /// Handles a key; returns what to ask of the node.
    pub fn key(&mut self, key: KeyEvent, now_ms: u64) -> Vec<Action> {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        match key.code {
            KeyCode::Char('c' | 'd') if ctrl => return vec![Action::Quit],
            KeyCode::Char('n') if ctrl => return self.switch(true),
            KeyCode::Char('p') if ctrl => return self.switch(false),
            KeyCode::Tab => return self.switch(true),
            KeyCode::BackTab => return self.switch(false),
            KeyCode::F(1) => {
                self.help = !self.help;
                return Vec::new();
            }
            KeyCode::F(2) => {
                self.show_list = !self.show_list;
                return Vec::new();
            }
            _ => {}
        }
        if self.help {
            // Any other key closes the help.
            self.help = false;
            return Vec::new();
        }
        if self.selected.is_some()
            && let Some(actions) = self.key_on_selection(key)
        {
            return actions;
        }
        let idle = self.input.is_empty();
        match key.code {
            KeyCode::Esc => {
                if self.compose != Compose::New {
                    if matches!(self.compose, Compose::Edit { .. }) {
                        self.input.clear();
                    }
                    self.compose = Compose::New;
                } else if self.selected.is_some() {
                    self.selected = None;
                } else {
                    self.scroll = 0;
                }
                Vec::new()
            }
            KeyCode::Enter => self.submit(),
            KeyCode::Up if idle => self.up(),
            KeyCode::Down if idle => {
                self.select_down();
                Vec::new()
            }
            KeyCode::PageUp => {
                // Past the oldest loaded (on the screen already, or a page away): load more.
                let last = self.messages.len().saturating_sub(1);
                let at_top = self.oldest_drawn.get() || self.scroll + PAGE > last;
                self.scroll = (self.scroll + PAGE).min(last);
                if at_top {
                    self.load_older()
                } else {
                    Vec::new()
                }
            }
            KeyCode::PageDown => {
                self.scroll = self.scroll.saturating_sub(PAGE);
                Vec::new()
            }
            KeyCode::Char('?') if idle => {
                self.help = true;
                Vec::new()
            }
            KeyCode::Left => {
                self.input.left();
                Vec::new()
            }
            KeyCode::Right => {
                self.input.right();
                Vec::new()
            }
            KeyCode::Home => {
                self.input.home();
                Vec::new()
            }
            KeyCode::End => {
                self.input.end();
                Vec::new()
            }
            KeyCode::Char('a') if ctrl => {
                self.input.home();
                Vec::new()
            }
            KeyCode::Char('e') if ctrl => {
                self.input.end();
                Vec::new()
            }
            KeyCode::Char('u') if ctrl => {
                self.input.clear();
                Vec::new()
            }
            KeyCode::Backspace => {
                self.input.backspace();
                Vec::new()
            }
            KeyCode::Delete => {
                self.input.delete();
                Vec::new()
            }
            KeyCode::Char(_) if !ctrl && self.open_is_left() => {
                self.error = Some(LEFT_LINE.to_owned());
                Vec::new()
            }
            KeyCode::Char(c) if !ctrl => {
                self.input.insert(c);
                self.typed(now_ms)
            }
            _ => Vec::new(),
        }
    }

    /// Pasted text goes into the input line.
    pub fn paste(&mut self, text: &str, now_ms: u64) -> Vec<Action> {
        if self.open_is_left() {
            self.error = Some(LEFT_LINE.to_owned());
            return Vec::new();
        }
        self.selected = None;
        self.input.paste(text);
        self.typed(now_ms)
    }

    /// A typing notice at most every 3 s while writing a new message or reply.
    fn typed(&mut self, now_ms: u64) -> Vec<Action> {
        if matches!(self.compose, Compose::Edit { .. })
            || now_ms.saturating_sub(self.last_typing_ms) < 3_000
        {
            return Vec::new();
        }
        self.last_typing_ms = now_ms;
        self.open_id()
            .map(|group| vec![Action::Typing { group }])
            .unwrap_or_default()
    }

    /// A key while a message is selected: `Some` if it was a command on the message.
    fn key_on_selection(&mut self, key: KeyEvent) -> Option<Vec<Action>> {
        let m = self.selected_message()?.clone();
        let group = m.group.clone();
        let own = m.sender == self.me;
        let is_text = matches!(m.body, MessageBody::Text { .. }) && !m.deleted;
        let reactable =
            matches!(m.body, MessageBody::Text { .. } | MessageBody::File { .. }) && !m.deleted;
        let react = |emoji: &str| {
            let mine = m
                .reactions
                .iter()
                .any(|r| r.emoji == emoji && r.by.contains(&self.me));
            vec![Action::React {
                group: group.clone(),
                id: m.id.clone(),
                emoji: emoji.to_owned(),
                on: !mine,
            }]
        };
        let left = self.open_is_left();
        let actions = match key.code {
            KeyCode::Char('r' | 'e' | 'd' | '+' | '1'..='6') | KeyCode::Enter if left => {
                self.error = Some(LEFT_LINE.to_owned());
                Vec::new()
            }
            KeyCode::Char('r') if reactable => {
                self.compose = Compose::Reply {
                    id: m.id.clone(),
                    to: self.sender_of(&m),
                };
                self.selected = None;
                Vec::new()
            }
            KeyCode::Char('e') if own && is_text => {
                if let MessageBody::Text { text } = &m.body {
                    self.input.set(text);
                }
                self.compose = Compose::Edit { id: m.id.clone() };
                self.selected = None;
                Vec::new()
            }
            KeyCode::Char('d') if own && reactable => {
                self.selected = None;
                vec![Action::Delete {
                    group,
                    id: m.id.clone(),
                }]
            }
            KeyCode::Char('e' | 'd') if !own => {
                self.error = Some("only its sender can edit or delete a message".to_owned());
                Vec::new()
            }
            KeyCode::Char('+') if reactable => react(EMOJIS[0]),
            KeyCode::Char(c @ '1'..='6') if reactable => {
                let i = (c as usize) - ('1' as usize);
                react(EMOJIS[i])
            }
            KeyCode::Char('?') => {
                self.help = true;
                Vec::new()
            }
            KeyCode::Up | KeyCode::Down | KeyCode::Esc | KeyCode::Enter => return None,
            KeyCode::PageUp | KeyCode::PageDown => return None,
            KeyCode::Char(_) if !key.modifiers.contains(KeyModifiers::CONTROL) => {
                // Typing something else leaves the selection and writes.
                self.selected = None;
                return None;
            }
            _ => return None,
        };
        Some(actions)
    }

    /// Enter: send, reply or edit with the input line.
    fn submit(&mut self) -> Vec<Action> {
        if self.selected.is_some() && self.input.is_empty() {
            // Enter on a selected message: reply to it.
            if let Some(m) = self.selected_message().cloned() {
                self.compose = Compose::Reply {
                    to: self.sender_of(&m),
                    id: m.id,
                };
                self.selected = None;
            }
            return Vec::new();
        }
        let text = self.input.text();
        if text.trim().is_empty() {
            return Vec::new();
        }
        let Some(group) = self.open_id() else {
            self.error = Some("no chat is open: join or create a group first".to_owned());
            return Vec::new();
        };
        if self.open_is_left() {
            self.error = Some(LEFT_LINE.to_owned());
            return Vec::new();
        }
        self.input.clear();
        self.error = None;
        self.scroll = 0;
        self.selected = None;
        let compose = std::mem::replace(&mut self.compose, Compose::New);
        vec![match compose {
            Compose::New => Action::Send {
                group,
                text,
                reply_to: None,
            },
            Compose::Reply { id, .. } => Action::Send {
                group,
                text,
                reply_to: Some(id),
            },
            Compose::Edit { id } => Action::Edit { group, id, text },
        }]
    }
}

/// Whether a history entry is a line of its own in the chat (reactions, edits and deletes
/// only change the message they concern).
fn shown_in_list(m: &MessageInfo) -> bool {
    !matches!(
        m.body,
        MessageBody::Reaction { .. } | MessageBody::Edit { .. } | MessageBody::Delete { .. }
    )
}

/// Whether a message counts as unread (what people write, not membership notes).
fn counts_as_unread(body: &MessageBody) -> bool {
    matches!(body, MessageBody::Text { .. } | MessageBody::File { .. })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use kith_client::model::{MessageChange, PersonInfo, ReactionInfo};

    const ME: &str = "12D3KooWme";
    const ANN: &str = "12D3KooWann";

    fn group(id: &str, name: &str) -> GroupSummary {
        serde_json::from_value(serde_json::json!({
            "id": id, "name": name, "epoch": 1, "member_count": 2
        }))
        .unwrap()
    }

    fn text(id: &str, group: &str, sender: &str, text: &str) -> MessageInfo {
        MessageInfo::new(
            id.into(),
            group.into(),
            1,
            sender.into(),
            (60_000, 60_001),
            MessageBody::Text { text: text.into() },
        )
    }

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn ctrl(c: char) -> KeyEvent {
        KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL)
    }

    fn typed(app: &mut App, s: &str) {
        for c in s.chars() {
            app.key(key(KeyCode::Char(c)), 0);
        }
    }

    fn app() -> App {
        let mut app = App::new(
            ME.into(),
            &[group("g1", "friends"), group("g2", "work")],
            Some("g1"),
        );
        let actions = app.history_loaded(
            "g1",
            vec![
                text("m1", "g1", ANN, "hello"),
                text("m2", "g1", ME, "hi ann"),
            ],
        );
        assert_eq!(
            actions,
            [Action::MarkRead {
                group: "g1".into(),
                up_to: "m1".into()
            }]
        );
        app
    }

    #[test]
    fn opening_loads_the_named_chat() {
        let app = App::new(ME.into(), &[group("g1", "a"), group("g2", "b")], Some("g2"));
        assert_eq!(app.start(), [Action::Open { group: "g2".into() }]);
        let app = App::new(ME.into(), &[], None);
        assert!(app.start().is_empty());
    }

    #[test]
    fn events_fold_into_the_open_chat_and_count_unread_elsewhere() {
        let mut app = app();
        let acts = app.apply(
            NodeEvent::Message(Box::new(text("m3", "g1", ANN, "live"))),
            0,
        );
        assert_eq!(
            acts,
            [Action::MarkRead {
                group: "g1".into(),
                up_to: "m3".into()
            }]
        );
        assert_eq!(app.messages.len(), 3);
        // The same message again (an own send seen as an event) is not doubled.
        app.apply(
            NodeEvent::Message(Box::new(text("m3", "g1", ANN, "live"))),
            0,
        );
        assert_eq!(app.messages.len(), 3);
        app.apply(
            NodeEvent::Message(Box::new(text("x1", "g2", ANN, "elsewhere"))),
            0,
        );
        app.apply(
            NodeEvent::Message(Box::new(text("x2", "g2", ME, "mine"))),
            0,
        );
        assert_eq!(app.chats[1].unread, 1);
        assert_eq!(app.messages.len(), 3);

        // A reaction, then an edit and a delete, replace the message.
        let mut reacted = text("m1", "g1", ANN, "hello");
        reacted.reactions = vec![ReactionInfo {
            emoji: "👍".into(),
            by: vec![ME.into()],
        }];
        app.apply(
            NodeEvent::MessageChanged {
                group: "g1".into(),
                id: "m1".into(),
                by: ME.into(),
                change: MessageChange::Reaction {
                    emoji: "👍".into(),
                    on: true,
                },
                message: Some(Box::new(reacted)),
            },
            0,
        );
        assert_eq!(app.messages[0].reactions.len(), 1);
        let mut deleted = text("m2", "g1", ME, "");
        deleted.deleted = true;
        app.apply(
            NodeEvent::MessageChanged {
                group: "g1".into(),
                id: "m2".into(),
                by: ME.into(),
                change: MessageChange::Delete,
                message: Some(Box::new(deleted)),
            },
            0,
        );
        assert!(app.messages[1].deleted);

        // Switching clears the unread count and loads the other chat.
        assert_eq!(
            app.key(key(KeyCode::Tab), 0),
            [Action::Open { group: "g2".into() }]
        );
        assert_eq!(app.chats[1].unread, 0);
        assert!(app.messages.is_empty());
        assert_eq!(app.key(ctrl('p'), 0), [Action::Open { group: "g1".into() }]);
    }

    #[test]
    fn typing_notices_show_and_expire() {
        let mut app = app();
        let ann = PersonInfo {
            peer_id: ANN.into(),
            name: Some("Ann".into()),
            label: "Ann (KooWann)".into(),
        };
        app.apply(
            NodeEvent::Typing {
                group: "g1".into(),
                peer: ann,
            },
            1_000,
        );
        assert_eq!(app.typing_line().unwrap(), "Ann (KooWann) is typing…");
        assert!(!app.tick(2_000));
        assert!(app.tick(1_000 + TYPING_SHOWN_MS));
        assert_eq!(app.typing_line(), None);
    }

    #[test]
    fn enter_sends_and_typing_is_throttled() {
        let mut app = app();
        assert_eq!(
            app.key(key(KeyCode::Char('h')), 10_000),
            [Action::Typing { group: "g1".into() }]
        );
        assert!(app.key(key(KeyCode::Char('i')), 11_000).is_empty());
        assert_eq!(
            app.key(key(KeyCode::Enter), 11_000),
            [Action::Send {
                group: "g1".into(),
                text: "hi".into(),
                reply_to: None
            }]
        );
        assert!(app.input.is_empty());
        // Blank input sends nothing.
        typed(&mut app, "   ");
        assert!(app.key(key(KeyCode::Enter), 0).is_empty());
    }

    #[test]
    fn selection_reply_react_edit_delete() {
        let mut app = app();
        // Up on empty input selects the newest message, again the one before.
        app.key(key(KeyCode::Up), 0);
        assert_eq!(app.selected, Some(1));
        app.key(key(KeyCode::Up), 0);
        assert_eq!(app.selected, Some(0));
        // Ann's message is not ours: no edit or delete, and the letter is not typed.
        assert!(app.key(key(KeyCode::Char('d')), 0).is_empty());
        assert_eq!((app.selected, app.input.is_empty()), (Some(0), true));
        assert!(app.error.is_some());
        assert_eq!(
            app.key(key(KeyCode::Char('1')), 0),
            [Action::React {
                group: "g1".into(),
                id: "m1".into(),
                emoji: "👍".into(),
                on: true
            }]
        );
        // Already reacted: the same key takes it back.
        app.messages[0].reactions = vec![ReactionInfo {
            emoji: "🎉".into(),
            by: vec![ME.into()],
        }];
        assert_eq!(
            app.key(key(KeyCode::Char('6')), 0),
            [Action::React {
                group: "g1".into(),
                id: "m1".into(),
                emoji: "🎉".into(),
                on: false
            }]
        );
        // r: reply to it.
        app.key(key(KeyCode::Char('r')), 0);
        assert_eq!(app.selected, None);
        assert!(matches!(&app.compose, Compose::Reply { id, .. } if id == "m1"));
        typed(&mut app, "yes");
        assert_eq!(
            app.key(key(KeyCode::Enter), 0),
            [Action::Send {
                group: "g1".into(),
                text: "yes".into(),
                reply_to: Some("m1".into())
            }]
        );
        assert_eq!(app.compose, Compose::New);

        // e on our own message: edit it, prefilled.
        app.key(key(KeyCode::Up), 0);
        assert_eq!(app.selected, Some(1));
        app.key(key(KeyCode::Char('e')), 0);
        assert_eq!(app.input.text(), "hi ann");
        app.key(key(KeyCode::Backspace), 0);
        assert_eq!(
            app.key(key(KeyCode::Enter), 0),
            [Action::Edit {
                group: "g1".into(),
                id: "m2".into(),
                text: "hi an".into()
            }]
        );
        // d on our own message deletes it.
        app.key(key(KeyCode::Up), 0);
        assert_eq!(
            app.key(key(KeyCode::Char('d')), 0),
            [Action::Delete {
                group: "g1".into(),
                id: "m2".into()
            }]
        );
        // Esc cancels a reply, then a selection.
        app.key(key(KeyCode::Up), 0);
        app.key(key(KeyCode::Char('r')), 0);
        app.key(key(KeyCode::Esc), 0);
        assert_eq!(app.compose, Compose::New);
        app.key(key(KeyCode::Up), 0);
        app.key(key(KeyCode::Esc), 0);
        assert_eq!(app.selected, None);
        // Other letters on a selection write into the input.
        app.key(key(KeyCode::Up), 0);
        app.key(key(KeyCode::Char('x')), 0);
        assert_eq!((app.selected, app.input.text().as_str()), (None, "x"));
        // Down past the newest leaves the selection.
        app.input.clear();
        app.key(key(KeyCode::Up), 0);
        app.key(key(KeyCode::Down), 0);
        assert_eq!(app.selected, None);
    }

    #[test]
    fn quitting_help_and_the_list() {
        let mut app = app();
        assert_eq!(app.key(ctrl('c'), 0), [Action::Quit]);
        assert_eq!(app.key(ctrl('d'), 0), [Action::Quit]);
        app.key(key(KeyCode::Char('?')), 0);
        assert!(app.help);
        app.key(key(KeyCode::Char('q')), 0);
        assert!(!app.help);
        assert!(app.input.is_empty());
        // With text written, '?' is a character.
        typed(&mut app, "ok?");
        assert_eq!(app.input.text(), "ok?");
        app.key(key(KeyCode::F(2)), 0);
        assert!(app.show_list);
    }

    #[test]
    fn the_node_going_away_and_coming_back() {
        let mut app = app();
        assert!(app.connection_changed(true).is_empty());
        assert!(app.connection_changed(false).is_empty());
        assert_eq!(app.connection, Connection::Down);
        assert_eq!(
            app.connection_changed(true),
            [Action::Refresh, Action::Open { group: "g1".into() }]
        );
        assert_eq!(
            app.lagged(),
            [Action::Refresh, Action::Open { group: "g1".into() }]
        );
    }

    fn summaries(unread: &[(&str, u64, bool)]) -> Vec<GroupSummary> {
        unread
            .iter()
            .map(|(id, n, active)| {
                serde_json::from_value(serde_json::json!({
                    "id": id, "name": id, "epoch": 1, "member_count": 2,
                    "unread": n, "active": active
                }))
                .unwrap()
            })
            .collect()
    }

    #[test]
    fn unread_comes_from_the_node_and_is_asked_for_after_events() {
        let mut app = app();
        app.set_groups(&summaries(&[("g1", 3, true), ("g2", 1500, true)]));
        // The open chat is being read: no count; the node's count is capped.
        assert_eq!(app.chats[0].unread, 0);
        assert_eq!(app.chats[1].unread, MAX_UNREAD);
        assert_eq!(app.chats[1].unread_label().as_deref(), Some("999+"));
        app.set_groups(&summaries(&[("g1", 3, true), ("g2", 2, true)]));
        assert_eq!(app.chats[1].unread_label().as_deref(), Some("2"));
        assert_eq!(app.open, Some(0));

        // Events: shown at once, then one request for the list after the burst.
        assert_eq!(app.groups_due(), None);
        app.apply(
            NodeEvent::Message(Box::new(text("x1", "g2", ANN, "one"))),
            1_000,
        );
        assert_eq!(app.chats[1].unread, 3);
        app.apply(
            NodeEvent::Message(Box::new(text("x2", "g2", ANN, "two"))),
            1_100,
        );
        assert_eq!(app.groups_due(), Some(1_000 + GROUPS_DEBOUNCE_MS));
        assert!(app.due(1_200).is_empty());
        assert_eq!(app.due(1_000 + GROUPS_DEBOUNCE_MS), [Action::Groups]);
        assert_eq!(app.groups_due(), None);
        assert!(app.due(5_000).is_empty());
        // The node's answer replaces the local count (it also knows what was read
        // elsewhere, e.g. in the web app).
        app.set_groups(&summaries(&[("g1", 0, true), ("g2", 0, true)]));
        assert_eq!(app.chats[1].unread_label(), None);
        // A read mark and a membership change ask again too.
        app.apply(
            NodeEvent::Read {
                group: "g2".into(),
                peer: ME.into(),
                up_to: "x2".into(),
            },
            9_000,
        );
        assert_eq!(app.groups_due(), Some(9_000 + GROUPS_DEBOUNCE_MS));
        // Reconnecting loads status and list at once.
        app.connection_changed(false);
        assert_eq!(app.connection_changed(true)[0], Action::Refresh);
    }

    #[test]
    fn a_left_group_is_read_only() {
        let mut app = app();
        app.set_groups(&summaries(&[("g1", 0, false), ("g2", 0, true)]));
        assert!(app.open_is_left());
        typed(&mut app, "hi");
        assert!(app.input.is_empty());
        assert_eq!(app.error.as_deref(), Some(LEFT_LINE));
        assert!(app.paste("pasted", 0).is_empty());
        assert!(app.input.is_empty());
        // Reading still works; answering a selected message does not.
        app.key(key(KeyCode::Up), 0);
        assert_eq!(app.selected, Some(1));
        app.error = None;
        assert!(app.key(key(KeyCode::Char('r')), 0).is_empty());
        assert!(app.key(key(KeyCode::Char('1')), 0).is_empty());
        assert_eq!(app.error.as_deref(), Some(LEFT_LINE));
        assert_eq!(app.compose, Compose::New);
        // Another chat takes input as usual.
        app.key(key(KeyCode::Esc), 0);
        app.key(key(KeyCode::Tab), 0);
        app.history_loaded("g2", Vec::new());
        typed(&mut app, "ok");
        assert_eq!(
            app.key(key(KeyCode::Enter), 0),
            [Action::Send {
                group: "g2".into(),
                text: "ok".into(),
                reply_to: None
            }]
        );
    }

    fn texts(group: &str, ids: std::ops::Range<usize>) -> Vec<MessageInfo> {
        ids.map(|i| text(&format!("m{i:04}"), group, ANN, &format!("text {i}")))
            .collect()
    }

    #[test]
    fn scrolling_past_the_oldest_loads_the_page_before_and_keeps_the_view() {
        let mut app = App::new(ME.into(), &[group("g1", "friends")], Some("g1"));
        // A full first page: there may be more.
        app.history_loaded("g1", texts("g1", 300..500));
        assert!(app.has_older);
        // Far from the top, PageUp only scrolls.
        assert!(app.key(key(KeyCode::PageUp), 0).is_empty());
        assert_eq!(app.scroll, PAGE);
        // The oldest is on the screen: the next PageUp asks for the page before it, once.
        app.oldest_drawn.set(true);
        assert_eq!(
            app.key(key(KeyCode::PageUp), 0),
            [Action::Older {
                group: "g1".into(),
                before: "m0300".into(),
            }]
        );
        assert!(app.loading_older);
        assert!(app.key(key(KeyCode::PageUp), 0).is_empty());
        let scroll = app.scroll;
        // The page arrives: in front, the view (counted from the newest) unchanged.
        let mut page = texts("g1", 200..300);
        // A reaction row in the page is not a line of its own.
        page[0].body = MessageBody::Reaction {
            to: "m0250".into(),
            emoji: "👍".into(),
            on: true,
        };
        app.older_loaded("g1", "m0300", page);
        assert!(!app.loading_older);
        assert!(app.has_older);
        assert_eq!(app.messages.len(), 299);
        assert_eq!(app.messages[0].id, "m0201");
        assert_eq!(app.messages[99].id, "m0300");
        assert_eq!(app.scroll, scroll);

        // Up at the oldest does it too, and the selection stays on its message.
        app.selected = Some(1);
        app.oldest_drawn.set(false);
        assert_eq!(
            app.key(key(KeyCode::Up), 0),
            [Action::Older {
                group: "g1".into(),
                before: "m0201".into()
            }]
        );
        assert_eq!(app.selected, Some(0));
        // A short page is the start of the chat: no more asking.
        app.older_loaded("g1", "m0201", texts("g1", 0..50));
        assert!(!app.has_older);
        assert_eq!(app.selected, Some(50));
        assert_eq!(app.selected_message().unwrap().id, "m0201");
        app.selected = Some(0);
        assert!(app.key(key(KeyCode::Up), 0).is_empty());

        // Loading the newest again (a receipt, a reconnect) keeps the older pages and the
        // selected message.
        app.selected = Some(10);
        let newest = texts("g1", 301..501);
        app.history_loaded("g1", newest);
        assert_eq!(app.messages.len(), 350);
        assert_eq!(app.messages[0].id, "m0000");
        assert_eq!(app.messages.last().unwrap().id, "m0500");
        assert_eq!(app.selected_message().unwrap().id, "m0010");
        assert!(!app.has_older);

        // A page for a chat no longer open, or before a message no longer the oldest, is
        // dropped.
        app.older_loaded("g2", "m0000", texts("g2", 0..10));
        app.older_loaded("g1", "m0100", texts("g1", 0..10));
        assert_eq!(app.messages.len(), 350);
    }

    #[test]
    fn a_short_history_is_the_whole_chat() {
        let mut app = app();
        assert!(!app.has_older);
        app.oldest_drawn.set(true);
        assert!(app.key(key(KeyCode::PageUp), 0).is_empty());
    }

    #[test]
    fn history_of_another_chat_is_ignored() {
        let mut app = app();
        assert!(
            app.history_loaded("g2", vec![text("z", "g2", ANN, "other")])
                .is_empty()
        );
        assert_eq!(app.messages.len(), 2);
    }
}
