//! `kith chat` as a person uses it: the full-screen client in a pseudo-terminal (the screen
//! read as a grid of cells through a terminal emulator), against two real nodes in one
//! group on loopback; and the plain mode through pipes.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::num::NonZeroU16;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kith_client::model::{MessageBody, MessageInfo, ProfileBody};
use kith_tests::{InGroup, TestNode, WAIT, api_addr, group_of, kith_bin, wait_event, wait_mesh};
use portable_pty::{Child, MasterPty, PtySize, native_pty_system};

/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(50);

/// A `kith chat` process in a pseudo-terminal, its output fed to a terminal emulator.
struct Pty {
    master: Box<dyn MasterPty + Send>,
    writer: Box<dyn Write + Send>,
    child: Box<dyn Child + Send + Sync>,
    /// The emulated screen and every byte the client wrote.
    screen: Arc<Mutex<(vt100::Parser, Vec<u8>)>>,
}

fn size(rows: u16, cols: u16) -> PtySize {
    PtySize {
        rows,
        cols,
        pixel_width: 0,
        pixel_height: 0,
    }
}

fn nz(n: u16) -> NonZeroU16 {
    NonZeroU16::new(n).unwrap()
}

impl Pty {
    /// Starts `kith --data-dir DIR ARGS` in a `rows`×`cols` pseudo-terminal.
    fn spawn(dir: &Path, args: &[&str], rows: u16, cols: u16) -> Pty {
        Pty::spawn_with(dir, args, rows, cols, &[])
    }

    /// [`Pty::spawn`] with more environment variables.
    fn spawn_with(dir: &Path, args: &[&str], rows: u16, cols: u16, env: &[(&str, &str)]) -> Pty {
        let pair = native_pty_system().openpty(size(rows, cols)).unwrap();
        let mut cmd = portable_pty::CommandBuilder::new(kith_bin().unwrap());
        cmd.arg("--data-dir");
        cmd.arg(dir);
        cmd.args(args);
        cmd.env("TERM", "xterm-256color");
        cmd.env_remove("RUST_LOG");
        cmd.env_remove("KITH_API");
        cmd.env_remove("KITH_DATA_DIR");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.cwd(dir);
        let child = pair.slave.spawn_command(cmd).unwrap();
        drop(pair.slave);
        let mut reader = pair.master.try_clone_reader().unwrap();
        let writer = pair.master.take_writer().unwrap();
        let screen = Arc::new(Mutex::new((
            vt100::Parser::new(nz(rows), nz(cols), 0),
            Vec::new(),
        )));
        let feed = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let mut s = feed.lock().unwrap();
                        s.0.process(&buf[..n]);
                        s.1.extend_from_slice(&buf[..n]);
                    }
                }
            }
        });
        Pty {
            master: pair.master,
            writer,
            child,
            screen,
        }
    }

    /// The screen's rows as text.
    fn rows(&self) -> Vec<String> {
        let s = self.screen.lock().unwrap();
        let (_, cols) = s.0.screen().size();
        s.0.screen().rows(0, cols.get()).collect()
    }

    fn text(&self) -> String {
        self.rows().join("\n")
    }

    /// Types `bytes` as keys.
    fn keys(&mut self, bytes: &str) {
        self.writer.write_all(bytes.as_bytes()).unwrap();
        self.writer.flush().unwrap();
    }

    /// Resizes the terminal (the client gets SIGWINCH) and the emulated screen.
    fn resize(&mut self, rows: u16, cols: u16) {
        self.screen
            .lock()
            .unwrap()
            .0
            .screen_mut()
            .set_size(nz(rows), nz(cols));
        self.master.resize(size(rows, cols)).unwrap();
    }

    /// Polls the screen until `pred` holds on its rows; fails with the screen after [`WAIT`].
    async fn wait(&self, what: &str, pred: impl Fn(&[String]) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let rows = self.rows();
            if pred(&rows) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; the screen:\n{}",
                    rows.join("\n")
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn wait_text(&self, what: &str) {
        self.wait(&format!("{what:?} on the screen"), |rows| {
            rows.iter().any(|r| r.contains(what))
        })
        .await;
    }

    /// Waits for the process to exit; its exit code.
    async fn exit_code(&mut self) -> u32 {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.exit_code();
            }
            if tokio::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("kith chat did not exit; the screen:\n{}", self.text());
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn set_name(name: &str) -> ProfileBody {
    ProfileBody {
        name: name.to_owned(),
        avatar: None,
    }
}

async fn history(node: &TestNode) -> Vec<MessageInfo> {
    node.node
        .engine
        .in_group("friends", |e, g| e.history(g, 1000))
        .await
        .unwrap()
}

/// Polls `node`'s history until one message satisfies `pred`.
async fn wait_history(
    node: &TestNode,
    what: &str,
    pred: impl Fn(&MessageInfo) -> bool,
) -> MessageInfo {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let h = history(node).await;
        if let Some(m) = h.iter().find(|m| pred(m)) {
            return m.clone();
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}; history: {h:#?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

fn is_text(m: &MessageInfo, want: &str) -> bool {
    matches!(&m.body, MessageBody::Text { text } if text == want)
}

/// Two nodes in the group "friends", each with a name; Bob has said hello and Ann has it.
async fn pair(dirs: &[tempfile::TempDir]) -> (TestNode, TestNode) {
    let (mut nodes, _group) = group_of(dirs, "friends").await.unwrap();
    let bob = nodes.pop().unwrap();
    let ann = nodes.pop().unwrap();
    let mut ann_events = ann.node.engine.subscribe();
    ann.node
        .engine
        .run(|e| e.set_profile(set_name("Ann")))
        .await
        .unwrap();
    bob.node
        .engine
        .run(|e| e.set_profile(set_name("Bob")))
        .await
        .unwrap();
    wait_event(&mut ann_events, "Bob's profile on Ann", |e| {
        matches!(e, kith_client::model::NodeEvent::ProfileUpdated { profile, .. } if profile.name == "Bob")
    })
    .await
    .unwrap();
    bob.node
        .engine
        .send_text("friends", "hello from bob")
        .await
        .unwrap();
    wait_history(&ann, "Bob's hello on Ann", |m| is_text(m, "hello from bob")).await;
    (ann, bob)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_full_screen_client_chats_replies_reacts_resizes_and_quits() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (ann, bob) = pair(&dirs).await;
    let ann_peer = ann.node.peer_id.to_string();

    let mut pty = Pty::spawn(&ann.dir, &["chat", "friends"], 30, 100);
    // The chats list, the history with Bob's name, the status and the footer.
    pty.wait("the chats list, history and footer", |rows| {
        let all = rows.join("\n");
        all.contains("▶ friends")
            && all.contains("hello from bob")
            && all.contains("Bob (")
            && all.contains("connected")
            && rows[29].contains("Enter send")
    })
    .await;

    // A message from the other node appears live.
    let live = bob
        .node
        .engine
        .send_text("friends", "live from bob")
        .await
        .unwrap();
    pty.wait_text("live from bob").await;

    // A line typed and Enter: the other node gets it.
    pty.keys("hi from the tui\r");
    wait_history(&bob, "the typed line on Bob", |m| {
        is_text(m, "hi from the tui") && m.sender == ann_peer
    })
    .await;
    pty.wait("the sent line on the screen", |rows| {
        rows.iter().any(|r| r.contains("hi from the tui"))
            && !rows.iter().any(|r| r.starts_with("> hi"))
    })
    .await;

    // Up twice selects Bob's live message (the newest is our own); r replies to it.
    pty.keys("\x1b[A\x1b[A");
    pty.wait_text("r reply · e edit").await;
    pty.keys("r");
    pty.wait_text("↪ Bob").await;
    pty.keys("a reply\r");
    let reply = wait_history(&bob, "the reply on Bob", |m| is_text(m, "a reply")).await;
    assert_eq!(reply.reply_to.as_ref().unwrap().id, live.id, "{reply:#?}");
    pty.wait("the reply quote on the screen", |rows| {
        rows.iter()
            .any(|r| r.contains("↪ Bob") && r.contains("live from bob"))
    })
    .await;

    // Select Bob's message again (three up: the reply, our line, his) and react with 2.
    pty.keys("\x1b[A\x1b[A\x1b[A");
    pty.wait_text("1-6 react").await;
    pty.keys("2");
    let reacted = wait_history(&bob, "Ann's reaction on Bob", |m| {
        m.id == live.id
            && m.reactions
                .iter()
                .any(|r| r.emoji == "❤️" && r.by.contains(&ann_peer))
    })
    .await;
    assert_eq!(reacted.reactions.len(), 1);
    // (Terminals differ on the width of an emoji with a variation selector: look for
    // its first character and the count apart.)
    pty.wait("the reaction on the screen", |rows| {
        rows.iter().any(|r| r.contains('❤') && r.contains("1*"))
    })
    .await;
    // The same key again takes it back.
    pty.keys("2");
    wait_history(&bob, "the reaction taken back on Bob", |m| {
        m.id == live.id && m.reactions.is_empty()
    })
    .await;
    pty.keys("\x1b");
    pty.wait_text("Enter send").await;

    // Narrower and shorter: everything is drawn again in the new size, the list hidden.
    pty.resize(20, 50);
    pty.wait("a redraw at 20x50", |rows| {
        rows.len() == 20
            && rows[19].starts_with("Enter send")
            && rows[18].starts_with("> ")
            && rows[17].contains("connected")
            && rows[0].starts_with("friends")
            && !rows.iter().any(|r| r.contains("▶ friends"))
            && rows.iter().any(|r| r.contains("a reply"))
    })
    .await;
    // Wider again: the list is back.
    pty.resize(30, 110);
    pty.wait("a redraw at 30x110", |rows| {
        rows.len() == 30 && rows[0].contains("chats") && rows[29].starts_with("Enter send")
    })
    .await;
    let screenshot = pty.text();

    // Ctrl-C: exit 0, the alternate screen left last.
    pty.keys("\x03");
    assert_eq!(pty.exit_code().await, 0, "{}", pty.text());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let done = {
            let s = pty.screen.lock().unwrap();
            let raw = &s.1;
            let leave = b"\x1b[?1049l";
            let last = raw.windows(leave.len()).rposition(|w| w == leave);
            let tail = last.map(|i| String::from_utf8_lossy(&raw[i + leave.len()..]).into_owned());
            match tail {
                Some(tail) => {
                    assert!(!s.0.screen().alternate_screen());
                    // Only the cursor shown again after it, nothing drawn.
                    assert!(
                        tail.chars()
                            .all(|c| !c.is_alphanumeric() || "25h".contains(c)),
                        "after leaving the alternate screen: {tail:?}"
                    );
                    true
                }
                None => false,
            }
        };
        if done {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the client never left the alternate screen"
        );
        tokio::time::sleep(POLL).await;
    }
    if std::env::var_os("KITH_TUI_SCREENSHOT").is_some() {
        println!("{screenshot}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_full_screen_client_follows_its_node_to_a_new_port_and_logs_off_screen() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (ann, bob) = pair(&dirs).await;
    let bob_peer = bob.node.peer_id.to_string();
    let old = api_addr(&bob.dir).unwrap();

    // Bob's client, with logs asked for: they go to chat.log, never to the screen.
    let mut pty = Pty::spawn_with(
        &bob.dir,
        &["chat", "friends"],
        30,
        100,
        &[("RUST_LOG", "trace")],
    );
    pty.wait("the history, connected", |rows| {
        let all = rows.join("\n");
        all.contains("hello from bob") && all.contains("● connected")
    })
    .await;

    // Bob's node stops: the client says so and keeps trying.
    let stopped = bob.stop().await;
    pty.wait_text("node not reachable").await;
    // It starts again on a new API port (port 0; should it get the old one back by
    // chance, start it once more, so the test is about a new port).
    let mut bob = stopped.start().await.unwrap();
    while api_addr(&bob.dir).unwrap() == old {
        bob = bob.restart().await.unwrap();
    }
    pty.wait("connected again", |rows| {
        rows.iter().any(|r| r.contains("● connected"))
    })
    .await;
    wait_mesh(&[&ann, &bob]).await.unwrap();

    // A message from Ann appears, and a typed line is delivered: both through the new port.
    ann.node
        .engine
        .send_text("friends", "after the restart")
        .await
        .unwrap();
    pty.wait_text("after the restart").await;
    pty.keys("still here\r");
    wait_history(&ann, "the line typed after the restart on Ann", |m| {
        is_text(m, "still here") && m.sender == bob_peer
    })
    .await;

    pty.keys("\x03");
    assert_eq!(pty.exit_code().await, 0, "{}", pty.text());
    let raw = String::from_utf8_lossy(&pty.screen.lock().unwrap().1).into_owned();
    for level in ["TRACE", "DEBUG", " INFO ", " WARN ", "ERROR"] {
        assert!(!raw.contains(level), "a log line on the terminal: {raw:?}");
    }
    let log = std::fs::read_to_string(bob.dir.join("chat.log")).unwrap();
    assert!(!log.is_empty(), "nothing in chat.log");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_chats_list_counts_unread_from_the_node_and_paging_reaches_the_start() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (ann, bob) = pair(&dirs).await;
    // A second group, where Bob writes three times before Ann's client starts.
    let (second, invite) = ann.group_with_invite("second", 1).await.unwrap();
    let mut ann_events = ann.node.engine.subscribe();
    bob.node.engine.join(invite.link).await.unwrap();
    wait_event(&mut ann_events, "Bob in the second group", |e| {
        matches!(e, kith_client::model::NodeEvent::EpochChanged { group, member_count: 2, .. } if *group == second.id)
    })
    .await
    .unwrap();
    for i in 0..3 {
        bob.node
            .engine
            .send_text("second", &format!("unread {i}"))
            .await
            .unwrap();
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let h = ann
            .node
            .engine
            .in_group("second", |e, g| e.history(g, 1000))
            .await
            .unwrap();
        if h.iter().any(|m| is_text(m, "unread 2")) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Bob's texts never reached Ann: {h:#?}"
        );
        tokio::time::sleep(POLL).await;
    }
    // More of "friends" than one load holds (200 entries): its start is a page back.
    for i in 0..220 {
        ann.node
            .engine
            .send_text("friends", &format!("old {i:03}"))
            .await
            .unwrap();
    }

    let mut pty = Pty::spawn(&ann.dir, &["chat", "friends"], 30, 100);
    // Counted by the node, though the client was not running when they came.
    pty.wait("the unread count of the second group", |rows| {
        let all = rows.join("\n");
        all.contains("second (3)") && all.contains("old 219")
    })
    .await;
    assert!(!pty.text().contains("created the group 'friends'"));
    // PageUp, again and again: past the oldest loaded, the page before it comes, until
    // the group's first line.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !pty.text().contains("created the group 'friends'") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "paging back never reached the start; the screen:\n{}",
            pty.text()
        );
        pty.keys("\x1b[5~");
        tokio::time::sleep(POLL).await;
    }
    // Opening the second group reads it; the count is gone.
    pty.keys("\t");
    pty.wait("the second group open and read", |rows| {
        let all = rows.join("\n");
        all.contains("▶ second") && all.contains("unread 2") && !all.contains("(3)")
    })
    .await;
    pty.keys("\x03");
    assert_eq!(pty.exit_code().await, 0, "{}", pty.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_mode_reads_lines_and_prints_safe_ones() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (ann, bob) = pair(&dirs).await;
    bob.node
        .engine
        .send_text("friends", "evil \x1b[2J\x1b]0;title\x07 \u{202E}txet")
        .await
        .unwrap();
    wait_history(
        &ann,
        "the evil text on Ann",
        |m| matches!(&m.body, MessageBody::Text { text } if text.starts_with("evil")),
    )
    .await;

    // Pipes, not a terminal: the plain mode without asking.
    let mut child = Command::new(kith_bin().unwrap())
        .arg("--data-dir")
        .arg(&ann.dir)
        .args(["chat", "friends"])
        .env_remove("RUST_LOG")
        .env_remove("KITH_API")
        .env_remove("KITH_DATA_DIR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen: Vec<String> = Vec::new();
    let mut wait_line = async |what: &str| -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            while let Ok(l) = lines.try_recv() {
                seen.push(l);
            }
            if let Some(l) = seen.iter().find(|l| l.contains(what)) {
                return l.clone();
            }
            if tokio::time::Instant::now() > deadline {
                panic!("timed out waiting for a line with {what:?}; lines: {seen:#?}");
            }
            tokio::time::sleep(POLL).await;
        }
    };
    // History first: `HH:MM name: text`, control characters neutralised.
    let hello = wait_line("hello from bob").await;
    assert!(hello.contains(" Bob ("), "{hello}");
    assert_eq!(&hello[2..3], ":", "{hello}");
    let evil = wait_line("evil").await;
    assert!(!evil.chars().any(char::is_control), "{evil:?}");
    assert!(!evil.contains('\u{202E}'), "{evil:?}");
    assert!(evil.contains("\u{FFFD}[2J"), "{evil:?}");

    // A line in is a message out; Bob's next one is printed live.
    let stdin = child.stdin.as_mut().unwrap();
    stdin.write_all(b"from the pipe\n").unwrap();
    stdin.flush().unwrap();
    wait_history(&bob, "the piped line on Bob", |m| {
        is_text(m, "from the pipe")
    })
    .await;
    assert!(wait_line("from the pipe").await.contains(" you: "));
    bob.node
        .engine
        .send_text("friends", "bob again")
        .await
        .unwrap();
    wait_line("bob again").await;

    // EOF ends it, with status 0.
    drop(child.stdin.take());
    let deadline = tokio::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "plain chat did not end at EOF"
        );
        tokio::time::sleep(POLL).await;
    };
    assert!(status.success(), "{status}");

    // Without a group, and two groups: one clear line and a failure.
    ann.node
        .engine
        .run(|e| e.create_group("second"))
        .await
        .unwrap();
    let out = Command::new(kith_bin().unwrap())
        .arg("--data-dir")
        .arg(&ann.dir)
        .arg("chat")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: this node is in 2 groups"), "{err}");
}
