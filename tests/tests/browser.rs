//! The web app in a real browser: headless Chromium, driven through chromedriver, against
//! real nodes on loopback. Each test logs its browsers in with a login code (what
//! `kith open` does) and works the app as a person would: clicks, typing, a file input.
//!
//! Without Chromium the tests print `skipped: chromium not found` and pass, unless
//! `KITH_REQUIRE_BROWSER=1` (CI). With `KITH_SCREENSHOTS=<dir>` they also save PNGs of the
//! main views there (docs/screenshots/ holds the committed ones):
//!
//! ```sh
//! KITH_SCREENSHOTS=$PWD/docs/screenshots cargo test -p kith-tests --test browser
//! ```

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, bail};
use kith_tests::browser::{Driver, ENTER, Session};
use kith_tests::{TestNode, api_addr, api_token, group_of, loopback_config, raw_http};
use serde_json::{Value, json};

/// A node and its API, as its user's browser and the test reach it.
struct Person {
    api: SocketAddr,
    token: String,
    http: reqwest::Client,
}

impl Person {
    async fn of(node: &TestNode, name: &str) -> anyhow::Result<Person> {
        let p = Person {
            api: api_addr(&node.dir)?,
            token: api_token(&node.dir)?,
            http: reqwest::Client::builder().no_proxy().build()?,
        };
        p.call("PUT", "/v1/profile", Some(json!({ "name": name })))
            .await?;
        Ok(p)
    }

    /// One API request with the bearer token (the CLI's way in).
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("http://{}{path}", self.api);
        let req = match method {
            "GET" => self.http.get(&url),
            "PUT" => self.http.put(&url),
            "DELETE" => self.http.delete(&url),
            _ => self.http.post(&url),
        };
        let req = match body {
            Some(b) => req.json(&b),
            None => req,
        };
        let res = req.bearer_auth(&self.token).send().await?;
        let status = res.status();
        let text = res.text().await?;
        if !status.is_success() {
            bail!("{method} {path}: {status} {text}");
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    fn app_url(&self) -> String {
        format!("http://{}/app/", self.api)
    }

    /// Logs `s` in as `kith open` would: a login code from the node, then its URL.
    async fn login(&self, s: &Session) -> anyhow::Result<()> {
        let code = self.call("POST", "/v1/web/login-codes", None).await?;
        let code = code["code"].as_str().context("login code")?;
        s.goto(&format!("http://{}/app/login?code={code}", self.api))
            .await?;
        app_shown(s).await?;
        let url = s.current_url().await?;
        if url.contains("code=") {
            bail!("the login code stayed in the address bar: {url}");
        }
        Ok(())
    }
}

/// Waits until the app (not the login screen) is shown.
async fn app_shown(s: &Session) -> anyhow::Result<()> {
    s.wait_for(
        "the app to show",
        "return !document.querySelector('#app').hidden && document.querySelector('#login').hidden;",
    )
    .await?;
    Ok(())
}

async fn open_chat(s: &Session, group: &str) -> anyhow::Result<()> {
    s.click(&format!("#chats li[data-id=\"{group}\"]")).await?;
    s.find("#chat-view #text").await?;
    Ok(())
}

/// Waits for a text message `text` in the open chat; answers its element id.
async fn wait_msg(s: &Session, text: &str) -> anyhow::Result<String> {
    let script = format!(
        "const m = [...document.querySelectorAll('#messages .msg')]
           .find((e) => e.querySelector('.text')?.textContent === {});
         return m ? m.id : null;",
        serde_json::to_string(text)?
    );
    let id = s.wait_for(&format!("message {text:?}"), &script).await?;
    Ok(id.as_str().context("message id")?.to_owned())
}

/// Sends `text` from the composer with Enter.
async fn send(s: &Session, text: &str) -> anyhow::Result<()> {
    s.type_into("#text", &format!("{text}{ENTER}")).await
}

/// Saves a screenshot as `<KITH_SCREENSHOTS>/<name>.png` when that is set.
async fn shot(s: &Session, name: &str) -> anyhow::Result<()> {
    if let Some(dir) = std::env::var_os("KITH_SCREENSHOTS") {
        let dir = Path::new(&dir);
        std::fs::create_dir_all(dir)?;
        // Let the last redraw and image decode land before the picture is taken.
        s.exec(
            "return new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));",
            vec![],
        )
        .await?;
        s.screenshot(&dir.join(format!("{name}.png"))).await?;
    }
    Ok(())
}

fn tempdirs<const N: usize>() -> anyhow::Result<[tempfile::TempDir; N]> {
    let v: Vec<_> = (0..N)
        .map(|_| tempfile::tempdir())
        .collect::<Result<_, _>>()?;
    v.try_into()
        .map_err(|_| anyhow::anyhow!("tempdirs: wrong count"))
}

/// Ann and Ben: two nodes in group `name`, each with a logged-in browser showing the chat.
struct Chat {
    _dirs: [tempfile::TempDir; 2],
    nodes: Vec<TestNode>,
    group: kith_client::model::GroupInfo,
    ann: Person,
    ben: Person,
    a: Session,
    b: Session,
}

async fn two_in_a_chat(driver: &std::sync::Arc<Driver>, name: &str) -> anyhow::Result<Chat> {
    let dirs = tempdirs::<2>()?;
    let (nodes, group) = group_of(&dirs, name).await?;
    let ann = Person::of(&nodes[0], "Ann").await?;
    let ben = Person::of(&nodes[1], "Ben").await?;
    let (a, b) = (driver.session().await?, driver.session().await?);
    ann.login(&a).await?;
    ben.login(&b).await?;
    open_chat(&a, &group.id).await?;
    open_chat(&b, &group.id).await?;
    Ok(Chat {
        _dirs: dirs,
        nodes,
        group,
        ann,
        ben,
        a,
        b,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_people_chat_live_with_a_reply_and_a_reaction() -> anyhow::Result<()> {
    let Some(driver) = Driver::start().await? else {
        return Ok(());
    };
    let Chat {
        _dirs,
        nodes,
        group,
        ann,
        ben: _ben,
        a,
        b,
    } = two_in_a_chat(&driver, "book club").await?;

    send(&a, "hello from ann").await?;
    let id = wait_msg(&b, "hello from ann").await?;

    // Ben answers it and puts a reaction on it, through the message's actions.
    b.click(&format!("#{id} .bubble")).await?;
    b.click(&format!("#{id} button[aria-label=\"Reply\"]"))
        .await?;
    b.find("#context:not([hidden])").await?;
    send(&b, "hi ann, welcome").await?;
    b.click(&format!("#{id} .bubble")).await?;
    b.click(&format!("#{id} button[aria-label=\"React\"]"))
        .await?;
    b.click(".picker button[aria-label=\"👍\"]").await?;

    let reply = wait_msg(&a, "hi ann, welcome").await?;
    a.wait_for(
        "the reply's quote on Ann's side",
        &format!(
            "return document.querySelector('#{reply} .quote-text')?.textContent === 'hello from ann';"
        ),
    )
    .await?;
    a.wait_for(
        "Ben's reaction on Ann's side",
        &format!(
            "return [...document.querySelectorAll('#{id} .reaction')].some((r) => r.textContent === '👍 1');"
        ),
    )
    .await?;

    // Ann verifies Ben: the members panel, the safety number, the mark.
    a.click("#btn-members").await?;
    a.click("#side .member-actions button").await?;
    let digits = a
        .wait_for(
            "the safety number",
            "return document.querySelector('dialog.verify .safety')?.textContent;",
        )
        .await?;
    let digits: String = digits
        .as_str()
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    let v = ann
        .call(
            "GET",
            &format!(
                "/v1/groups/{}/members/{}/verification",
                group.id, nodes[1].node.peer_id
            ),
            None,
        )
        .await?;
    assert_eq!(digits, v["safety_number"].as_str().unwrap_or_default());
    a.wait_for(
        "the verify QR code",
        "const q = document.querySelector('dialog.verify img.qr'); return !!q && q.complete && q.naturalWidth > 0;",
    )
    .await?;
    shot(&a, "members-verify").await?;
    a.click("dialog.verify button.primary").await?;
    a.wait_for(
        "Ben marked verified in the members panel",
        "return !!document.querySelector('#side .verified');",
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_picture_sent_from_the_file_input_shows_on_the_other_side() -> anyhow::Result<()> {
    let Some(driver) = Driver::start().await? else {
        return Ok(());
    };
    let Chat {
        _dirs,
        nodes: _nodes,
        group,
        ann: _ann,
        ben,
        a,
        b,
    } = two_in_a_chat(&driver, "photos").await?;
    send(&a, "the view from the top").await?;

    let pic = tempfile::tempdir()?;
    let path = pic.path().join("summit.png");
    let img = image::RgbImage::from_fn(320, 200, |x, y| {
        let sky = y < 120;
        if sky {
            image::Rgb([(80 + y / 3) as u8, (140 + y / 2) as u8, 230])
        } else {
            image::Rgb([(40 + x / 8) as u8, (110 + (x + y) / 12) as u8, 60])
        }
    });
    img.save(&path)?;
    a.upload("#file", &path).await?;

    let shown = "const i = document.querySelector('#messages img.thumb');
                 return !!i && i.complete && i.naturalWidth > 0;";
    b.wait_for("the picture on Ben's side", shown).await?;
    a.wait_for("the picture on Ann's side", shown).await?;

    // Ben answers the picture and likes it (through the API), so the view shows both.
    let file_msg = b
        .exec(
            "return document.querySelector('#messages img.thumb').closest('.msg').id.slice(2);",
            vec![],
        )
        .await?;
    let file_msg = file_msg.as_str().context("file message id")?;
    ben.call(
        "POST",
        &format!("/v1/groups/{}/messages", group.id),
        Some(json!({"text": "wow, worth the climb", "reply_to": file_msg})),
    )
    .await?;
    ben.call(
        "POST",
        &format!("/v1/groups/{}/messages/{file_msg}/reactions", group.id),
        Some(json!({"emoji": "❤️"})),
    )
    .await?;
    wait_msg(&a, "wow, worth the climb").await?;
    a.wait_for(
        "the reaction on the picture",
        &format!("return !!document.querySelector('#m-{file_msg} .reaction');"),
    )
    .await?;
    shot(&a, "chat").await?;

    // Full size on a click.
    a.click(&format!("#m-{file_msg} .thumb-button")).await?;
    a.wait_for(
        "the full-size picture",
        "const i = document.querySelector('dialog.lightbox img.full'); return !!i && i.complete && i.naturalWidth === 320;",
    )
    .await?;

    // Everything the page loaded (scripts, styles, icons, thumbnails, the picture, the API,
    // the event stream) came from the node's own origin: no CDN, no fonts from elsewhere.
    let loaded = a
        .exec(
            "return [location.origin, performance.getEntriesByType('resource').map(e => e.name)];",
            vec![],
        )
        .await?;
    let origin = loaded[0].as_str().context("origin")?;
    let names = loaded[1].as_array().context("resource list")?;
    assert!(names.len() >= 5, "only {names:?}");
    let foreign: Vec<&Value> = names
        .iter()
        .filter(|n| {
            n.as_str()
                .is_none_or(|n| !n.starts_with(&format!("{origin}/")) && !n.starts_with("blob:"))
        })
        .collect();
    assert!(foreign.is_empty(), "requests to other origins: {foreign:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invite_made_in_the_app_is_joined_in_the_app() -> anyhow::Result<()> {
    let Some(driver) = Driver::start().await? else {
        return Ok(());
    };
    let dirs = tempdirs::<2>()?;
    let first = TestNode::start(dirs[0].path(), loopback_config(vec![])).await?;
    let boot = first.bootstrap_peer().await?;
    let second = TestNode::start(dirs[1].path(), loopback_config(vec![boot])).await?;
    let ann = Person::of(&first, "Ann").await?;
    let ben = Person::of(&second, "Ben").await?;
    let (a, b) = (driver.session().await?, driver.session().await?);
    ann.login(&a).await?;
    ben.login(&b).await?;

    // Ann creates the group and an invite link in the app.
    a.click("#btn-new").await?;
    a.type_into("dialog input[name=name]", &format!("hikers{ENTER}"))
        .await?;
    a.wait_for(
        "the new group's chat",
        "return document.querySelector('#chat-title').textContent === 'hikers';",
    )
    .await?;
    a.click("#btn-invite").await?;
    let uses = a.find("dialog.invite input[name=uses]").await?;
    a.send_keys(&uses, "\u{E003}3").await?; // Backspace, then 3 uses
    a.click("dialog.invite form button.primary").await?;
    let link = a
        .wait_for(
            "the invite link and its QR code",
            "const q = document.querySelector('dialog.invite img.qr');
             return q && q.complete && q.naturalWidth > 0 ? document.querySelector('dialog.invite input.link').value : null;",
        )
        .await?;
    let link = link.as_str().context("link")?.to_owned();
    assert!(link.starts_with("kith1"), "link: {link}");
    a.wait_for(
        "the invite in the dialog's list",
        "return !!document.querySelector('dialog.invite .invite-row.active');",
    )
    .await?;
    shot(&a, "invite").await?;
    a.click("dialog.invite button.close").await?;

    // Ben pastes it and watches the stages.
    b.click("#btn-join").await?;
    b.type_into("dialog.join textarea", &link).await?;
    b.click("dialog.join button[type=submit]").await?;
    b.wait_for(
        "the join to finish",
        "return !!document.querySelector('dialog.join .result.ok') && !!document.querySelector('dialog.join .stage.ready');",
    )
    .await?;
    let stages = b
        .exec(
            "return [...document.querySelectorAll('dialog.join .stage')].map((s) => s.dataset.kind);",
            vec![],
        )
        .await?;
    let stages: Vec<&str> = stages
        .as_array()
        .context("stages")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(stages.first(), Some(&"finding_members"), "{stages:?}");
    assert!(stages.contains(&"added"), "{stages:?}");
    shot(&b, "join").await?;
    b.click("#join-open").await?;
    b.wait_for(
        "the joined group's chat",
        "return document.querySelector('#chat-title').textContent === 'hikers';",
    )
    .await?;
    send(&b, "ben here, thanks").await?;
    wait_msg(&a, "ben here, thanks").await?;
    send(&a, "welcome ben").await?;
    wait_msg(&b, "welcome ben").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_session_and_a_narrow_window_shows_one_pane() -> anyhow::Result<()> {
    let Some(driver) = Driver::start().await? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let node = TestNode::start(dir.path(), loopback_config(vec![])).await?;
    let ann = Person::of(&node, "Ann").await?;
    let g = ann
        .call("POST", "/v1/groups", Some(json!({"name": "notes"})))
        .await?;
    let gid = g["id"].as_str().context("group id")?.to_owned();
    ann.call(
        "POST",
        &format!("/v1/groups/{gid}/messages"),
        Some(json!({"text": "remember the milk"})),
    )
    .await?;
    let s = driver.session().await?;
    ann.login(&s).await?;
    open_chat(&s, &gid).await?;
    wait_msg(&s, "remember the milk").await?;

    s.refresh().await?;
    app_shown(&s).await?;
    // Still logged in, back in the same chat.
    wait_msg(&s, "remember the milk").await?;
    s.wait_for(
        "the chat title after the reload",
        "return document.querySelector('#chat-title').textContent === 'notes';",
    )
    .await?;

    s.click("#btn-status").await?;
    s.wait_for(
        "the status dialog",
        "return document.querySelector('dialog.status dl')?.textContent.includes('Disk OK');",
    )
    .await?;
    shot(&s, "status").await?;
    s.click("dialog.status button.close").await?;

    s.set_window(400, 800).await?;
    s.wait_for(
        "the narrow layout: only the chat",
        "return getComputedStyle(document.querySelector('#sidebar')).display === 'none'
            && getComputedStyle(document.querySelector('#chat')).display !== 'none';",
    )
    .await?;
    shot(&s, "narrow-chat").await?;
    s.click("#back").await?;
    s.wait_for(
        "the narrow layout: only the list",
        "return getComputedStyle(document.querySelector('#chat')).display === 'none'
            && getComputedStyle(document.querySelector('#sidebar')).display !== 'none';",
    )
    .await?;
    shot(&s, "narrow-list").await?;
    Ok(())
}

/// The unread badge of the chat `group` in the list (empty when none is shown).
async fn badge(s: &Session, group: &str) -> anyhow::Result<String> {
    let v = s
        .exec(
            &format!(
                "return document.querySelector('#chats li[data-id=\"{group}\"] .badge')?.textContent || '';"
            ),
            vec![],
        )
        .await?;
    Ok(v.as_str().unwrap_or_default().to_owned())
}

/// `unread` of `group` as the node of `p` counts it.
async fn unread_on_node(p: &Person, group: &str) -> anyhow::Result<u64> {
    let list = p.call("GET", "/v1/groups", None).await?;
    list.as_array()
        .context("group list")?
        .iter()
        .find(|g| g["id"] == group)
        .and_then(|g| g["unread"].as_u64())
        .context("the group's unread count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_counts_follow_the_node_and_scrolling_up_reads_older_pages() -> anyhow::Result<()> {
    let Some(driver) = Driver::start().await? else {
        return Ok(());
    };
    let dirs = tempdirs::<2>()?;
    let (nodes, group) = group_of(&dirs, "book club").await?;
    let ann = Person::of(&nodes[0], "Ann").await?;
    let ben = Person::of(&nodes[1], "Ben").await?;
    let notes = ann
        .call("POST", "/v1/groups", Some(json!({"name": "notes"})))
        .await?;
    let notes = notes["id"].as_str().context("group id")?.to_owned();
    let a = driver.session().await?;
    ann.login(&a).await?;
    // Ann has another chat open while Ben writes in the book club.
    open_chat(&a, &notes).await?;
    const N: usize = 120;
    for i in 0..N {
        ben.call(
            "POST",
            &format!("/v1/groups/{}/messages", group.id),
            Some(json!({ "text": format!("page {i}") })),
        )
        .await?;
    }
    a.wait_for(
        "the book club's badge to count Ben's messages",
        &format!(
            "const li = document.querySelector('#chats li[data-id=\"{}\"]');
             return !!li && li.querySelector('.badge')?.textContent === '{N}'
               && li.getAttribute('aria-label').includes('{N} unread')
               && li.querySelector('.chat-preview').textContent === 'page {}';",
            group.id,
            N - 1
        ),
    )
    .await?;
    assert_eq!(unread_on_node(&ann, &group.id).await?, N as u64);
    shot(&a, "chats-unread").await?;

    // Opening it reads it: the badge goes, and the node's count too (POST …/read).
    open_chat(&a, &group.id).await?;
    wait_msg(&a, &format!("page {}", N - 1)).await?;
    a.wait_for(
        "the badge to clear",
        &format!(
            "return !document.querySelector('#chats li[data-id=\"{}\"] .badge');",
            group.id
        ),
    )
    .await?;
    let deadline = std::time::Instant::now() + kith_tests::WAIT;
    while unread_on_node(&ann, &group.id).await? != 0 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the node still counts unread messages after the chat was read"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // Only the newest page is drawn at first; scrolling up brings the older ones.
    let shown = "return document.querySelectorAll('#messages .msg').length;";
    let first = a.exec(shown, vec![]).await?.as_u64().unwrap_or_default();
    assert!(first < N as u64, "all {first} messages were drawn at once");
    a.wait_for(
        "the first message after scrolling up",
        "const box = document.querySelector('#messages');
         box.scrollTop = 0;
         return [...box.querySelectorAll('.msg .text')].some((t) => t.textContent === 'page 0')
           && document.querySelector('#older').textContent === 'The start of the chat';",
    )
    .await?;
    let texts = a
        .exec(
            "return [...document.querySelectorAll('#messages .msg .text')].map((t) => t.textContent);",
            vec![],
        )
        .await?;
    let want: Vec<String> = (0..N).map(|i| format!("page {i}")).collect();
    assert_eq!(
        texts,
        json!(want),
        "the pages are not in order, or some repeat"
    );

    // While Ann reads the chat, Ben's next message is read at once: no badge, none counted.
    ben.call(
        "POST",
        &format!("/v1/groups/{}/messages", group.id),
        Some(json!({ "text": "are you there?" })),
    )
    .await?;
    a.exec(
        "const b = document.querySelector('#messages'); b.scrollTop = b.scrollHeight; return null;",
        vec![],
    )
    .await?;
    wait_msg(&a, "are you there?").await?;
    let deadline = std::time::Instant::now() + kith_tests::WAIT;
    while unread_on_node(&ann, &group.id).await? != 0 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "a message read on screen stayed unread on the node"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(badge(&a, &group.id).await?, "");
    Ok(())
}

/// Serves `page` to every request on a loopback listener of its own: another port, so
/// another origin than the node's.
fn serve_page(page: String) -> anyhow::Result<SocketAddr> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(5)));
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                page.len()
            );
        }
    });
    Ok(addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_from_another_origin_are_refused() -> anyhow::Result<()> {
    let Some(driver) = Driver::start().await? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let node = TestNode::start(dir.path(), loopback_config(vec![])).await?;
    let ann = Person::of(&node, "Ann").await?;
    let s = driver.session().await?;
    ann.login(&s).await?;

    // A page of another origin (same site: only the port differs, so the SameSite cookie
    // rides along) tries to create a group and to read the list, with the session cookie.
    let node_url = format!("http://{}", ann.api);
    let page = format!(
        r#"<!doctype html><title>elsewhere</title><script>
window.results = {{}};
const node = {node:?};
(async () => {{
  try {{
    const r = await fetch(node + '/v1/groups', {{method: 'POST', credentials: 'include',
      headers: {{'Content-Type': 'application/json'}}, body: JSON.stringify({{name: 'evil'}})}});
    results.post = 'status ' + r.status;
  }} catch (e) {{ results.post = 'failed'; }}
  try {{
    await fetch(node + '/v1/groups', {{method: 'POST', mode: 'no-cors', credentials: 'include',
      headers: {{'Content-Type': 'text/plain'}}, body: JSON.stringify({{name: 'evil2'}})}});
    results.simple = 'sent';
  }} catch (e) {{ results.simple = 'failed'; }}
  try {{
    const r = await fetch(node + '/v1/groups', {{credentials: 'include'}});
    results.get = 'status ' + r.status + ' ' + await r.text();
  }} catch (e) {{ results.get = 'failed'; }}
  results.done = true;
}})();
</script>"#,
        node = node_url
    );
    let other = serve_page(page)?;
    s.goto(&format!("http://{other}/")).await?;
    let results = s
        .wait_for(
            "the other origin's requests",
            "return window.results && window.results.done ? window.results : null;",
        )
        .await?;
    assert_eq!(results["post"], "failed", "{results}");
    assert_eq!(results["get"], "failed", "{results}");
    let groups = ann.call("GET", "/v1/groups", None).await?;
    assert_eq!(groups, json!([]), "a group was created from another origin");

    // What the node itself answers to such a request with the session cookie (the
    // browser hides it behind CORS): 403 cross_origin.
    let cookie = session_cookie(&s, &ann).await?;
    let (status, body) = raw_http(
        ann.api,
        "POST",
        "/v1/groups",
        &[
            &format!("Cookie: {cookie}"),
            &format!("Origin: http://{other}"),
            "Content-Type: application/json",
        ],
        r#"{"name":"evil3"}"#,
    )?;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("cross_origin"), "{body}");
    let (status, body) = raw_http(
        ann.api,
        "GET",
        "/v1/groups",
        &[&format!("Cookie: {cookie}"), "Sec-Fetch-Site: same-site"],
        "",
    )?;
    assert_eq!(status, 403, "{body}");
    assert_eq!(ann.call("GET", "/v1/groups", None).await?, json!([]));

    // A browser without a session gets the login screen.
    let fresh = driver.session().await?;
    fresh.goto(&ann.app_url()).await?;
    fresh
        .wait_for(
            "the login screen",
            "return !document.querySelector('#login').hidden && document.querySelector('#app').hidden
                && document.querySelector('#login').textContent.includes('kith open');",
        )
        .await?;
    Ok(())
}

/// The session cookie of `s` for the node, as `name=value`.
async fn session_cookie(s: &Session, p: &Person) -> anyhow::Result<String> {
    s.goto(&p.app_url()).await?;
    app_shown(s).await?;
    s.cookie_starting("kith_session_").await
}
