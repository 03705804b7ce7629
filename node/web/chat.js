// The chat view: history, live changes, the composer and attachments.

import * as api from './api.js';
import { h, fill, $, bytes, when, short, confirmDialog, dialogShell, openDialog } from './dom.js';
import { app, nameOf, notePeople, noteGone, goneText, scheduleRefresh, systemText, displayName, renderList, banner } from './app.js';
import * as panels from './panels.js';

const REACTIONS = ['👍', '❤️', '😂', '😮', '😢', '🎉'];
const PAGE = 50;
/** Pages `jumpTo` reads back at most looking for a quoted message. */
const MAX_JUMP_PAGES = 20;

/** The open chat: its messages by id in history order, and the composer's mode. */
const view = {
  gid: null,
  msgs: new Map(),
  order: [],
  /** The oldest message of the group is in view (no page further back). */
  atStart: false,
  /** A load of the newest page runs (its number): live messages wait in `live` meanwhile. */
  loading: 0,
  live: [],
  /** The group as GET /v1/groups/{g} answered (members, active, leaving). */
  info: null,
  /** The id this view last sent a read mark for. */
  posted: null,
  /** Quoted message id -> what the quote shows when the node gave no excerpt. */
  quotes: new Map(),
  /** file id -> message id, to route file_progress events. */
  files: new Map(),
  /** {kind: 'reply'|'edit', msg} or null. */
  mode: null,
  typers: new Map(),
  /** Blob URLs to revoke when the view changes. */
  urls: [],
};

const isImage = (mime) => /^image\/(png|jpeg|gif|webp)$/.test(mime);
const isShown = (m) => m.body.type === 'text' || m.body.type === 'file' || m.deleted;
const fileUrl = (m) => api.g(view.gid, 'messages', m.id, 'file');

// ---- opening and loading ------------------------------------------------------------

/** Shows group `gid` (or the empty pane for null). */
export async function open(gid) {
  $('#empty').hidden = !!gid;
  $('#chat-view').hidden = !gid;
  if (gid === view.gid) return;
  view.gid = gid;
  view.msgs.clear();
  view.order = [];
  view.files.clear();
  view.atStart = false;
  view.loading = 0;
  view.live = [];
  view.info = null;
  view.posted = null;
  view.quotes.clear();
  closePicker();
  view.typers.clear();
  setMode(null);
  $('#typing').textContent = '';
  fill($('#messages'));
  fill($('#requests'));
  panels.closeSide();
  if (!gid) return;
  drawHead();
  $('#text').value = draft(gid);
  await reload();
  onRequests();
  if (!matchMedia('(max-width: 600px)').matches || document.body.classList.contains('in-chat')) $('#text').focus();
}

function drawHead() {
  const g = app.groups.get(view.gid);
  if (!g) return;
  $('#chat-title').textContent = displayName(g.s);
  const gone = g.s.active === false;
  $('#chat-sub').textContent = gone ? goneText(view.gid)
    : g.s.direct ? 'Direct chat' : `${g.s.member_count} member${g.s.member_count === 1 ? '' : 's'}`;
  $('#chat-view').classList.toggle('gone', gone);
  $('#btn-invite').hidden = gone;
  // A group this node left takes no input: the composer gives way to a line saying so.
  $('#composer').hidden = gone;
  const note = $('#gone-note');
  note.hidden = !gone;
  if (gone) note.textContent = `${goneText(view.gid)}: you can read what is here, not write.`;
}

/** The chats list was read again: the open chat's header follows it. */
export function onSummary() {
  if (!view.gid) return;
  const wasActive = !$("#composer").hidden;
  drawHead();
  if (wasActive && $("#composer").hidden) panels.refreshSide();
}

let loads = 0;

/** Fetches the newest page (and the group's members) and redraws. */
export async function reload() {
  const gid = view.gid;
  const token = ++loads;
  view.loading = token;
  view.live = [];
  let list;
  let group;
  try {
    [list, group] = await Promise.all([
      api.get(api.g(gid, 'messages') + '?limit=' + PAGE),
      api.get(api.g(gid), { quiet: true }).catch(() => null),
    ]);
  } finally {
    if (view.loading === token) view.loading = 0;
  }
  if (gid !== view.gid || token !== loads) return;
  if (group) {
    view.info = group;
    notePeople(group.members);
  }
  noteGone(gid, list);
  const box = $('#messages');
  const stick = seesBottom() || !view.order.length;
  view.msgs.clear();
  view.files.clear();
  view.order = [];
  for (const m of list) put(m);
  // What arrived while the page was on its way: newer than the page, or a newer copy.
  for (const m of view.live) put(m);
  view.live = [];
  view.atStart = list.length < PAGE;
  closePicker();
  fill(box, startLine(), view.order.map((id) => render(view.msgs.get(id))));
  if (stick) box.scrollTop = box.scrollHeight;
  drawHead();
  markRead();
}

/** The line above the oldest message shown: more further up, or the start. */
function startLine() {
  return h('div', { id: 'older', class: 'older muted' }, view.atStart ? 'The start of the chat' : 'Scroll up for older messages');
}

function put(m) {
  if (!view.msgs.has(m.id)) view.order.push(m.id);
  view.msgs.set(m.id, m);
  if (m.body.type === 'file') view.files.set(m.body.file.id, m.id);
}

let loadingOlder = null;

/**
 * Reads the page before the oldest message shown (`before=`), puts it on top and keeps
 * what the user looks at where it is. Resolves once done; a call while one runs joins it.
 */
function older() {
  if (loadingOlder) return loadingOlder;
  if (!view.gid || view.loading || view.atStart || !view.order.length) return Promise.resolve();
  const gid = view.gid;
  loadingOlder = (async () => {
    try {
      const q = `?limit=${PAGE}&before=${encodeURIComponent(view.order[0])}`;
      const list = await api.get(api.g(gid, 'messages') + q);
      if (gid !== view.gid) return;
      const box = $('#messages');
      const height = box.scrollHeight;
      const top = box.scrollTop;
      const fresh = list.filter((m) => !view.msgs.has(m.id));
      for (const m of fresh) {
        view.msgs.set(m.id, m);
        if (m.body.type === 'file') view.files.set(m.body.file.id, m.id);
      }
      view.order = [...fresh.map((m) => m.id), ...view.order];
      view.atStart = list.length < PAGE;
      $('#older').replaceWith(startLine(), ...fresh.map(render));
      box.scrollTop = top + (box.scrollHeight - height);
    } finally {
      loadingOlder = null;
    }
  })();
  return loadingOlder;
}

/** Scrolled near the top: the page before, and again while the view is still near the top. */
async function olderOnScroll() {
  const box = $('#messages');
  while (view.gid && !view.atStart && !view.loading && box.scrollTop < 200 && box.scrollHeight > box.clientHeight) {
    const before = view.order.length;
    try {
      await older();
    } catch {
      return;
    }
    if (view.order.length === before) return;
  }
}

/** Whether the newest message is in sight (the user reads the chat). */
export function seesBottom() {
  const box = $('#messages');
  return document.visibilityState === 'visible' && !$('#chat-view').hidden
    && box.scrollHeight - box.scrollTop - box.clientHeight < 60;
}

/** Whether the user reads the open chat now: its newest message in sight, the window focused. */
export function reading() {
  return !!view.gid && seesBottom() && document.hasFocus();
}

let readTimer = null;

/** Tells the node the user read the chat, once the newest message is in sight. */
function markRead() {
  if (!reading()) return;
  clearTimeout(readTimer);
  readTimer = setTimeout(async () => {
    const gid = view.gid;
    const last = view.order[view.order.length - 1];
    if (!last || !reading()) return;
    const s = app.groups.get(gid)?.s;
    if (last === view.posted && !(s && s.unread)) return;
    view.posted = last;
    renderList();
    try {
      await api.post(api.g(gid, 'read'), { up_to: last }, { quiet: true });
    } catch {
      view.posted = null;
    }
    scheduleRefresh(0);
  }, 300);
}

// ---- drawing a message --------------------------------------------------------------

function render(m) {
  if (!isShown(m)) {
    return h('div', { class: 'system', id: 'm-' + m.id, role: 'note' }, systemText(m), ' · ', when(m.sent_at_ms));
  }
  const own = m.sender === app.me.peer_id;
  const el = h('div', {
    class: 'msg' + (own ? ' own' : '') + (m.deleted ? ' deleted' : ''),
    id: 'm-' + m.id, role: 'article', tabindex: '-1',
    'aria-label': `${nameOf(m.sender, m.sender_label)}, ${when(m.sent_at_ms)}`,
  });
  const bubble = h('div', { class: 'bubble' });
  if (!own) bubble.append(h('div', { class: 'sender' }, nameOf(m.sender, m.sender_label)));
  if (m.reply_to) {
    const r = m.reply_to;
    bubble.append(h('button', {
      type: 'button', class: 'quote', 'aria-label': 'Go to the message this answers',
      onclick: () => jumpTo(r.id),
    }, h('span', { class: 'quote-who' }, r.sender ? nameOf(r.sender.peer_id, r.sender.label) : 'A message'),
    h('span', { class: 'quote-text' }, quoteText(r))));
  }
  if (m.deleted) {
    bubble.append(h('div', { class: 'text muted' }, 'This message was deleted'));
  } else if (m.body.type === 'text') {
    bubble.append(h('div', { class: 'text' }, m.body.text));
  } else {
    bubble.append(fileView(m));
  }
  const meta = h('div', { class: 'meta muted' }, h('time', { datetime: new Date(m.sent_at_ms).toISOString(), title: new Date(m.sent_at_ms).toLocaleString() }, when(m.sent_at_ms)));
  if (m.edited_at_ms && !m.deleted) meta.append(' · ', h('span', { class: 'edited', title: 'Edited ' + new Date(m.edited_at_ms).toLocaleString() }, 'edited'));
  if (own && m.read_by && m.read_by.length) {
    meta.append(' · ', h('span', { class: 'read', title: 'Read by ' + m.read_by.map((p) => p.label).join(', ') }, `✓ read by ${m.read_by.length}`));
  }
  bubble.append(meta);
  el.append(bubble);
  if (m.reactions && m.reactions.length) {
    el.append(h('div', { class: 'reactions' }, m.reactions.map((r) => {
      const mine = r.by.includes(app.me.peer_id);
      return h('button', {
        type: 'button', class: 'reaction' + (mine ? ' mine' : ''), 'aria-pressed': mine ? 'true' : 'false',
        title: r.by.map((p) => nameOf(p)).join(', '),
        'aria-label': `${r.emoji} ${r.by.length}${mine ? ', yours: remove' : ''}`,
        onclick: () => react(m, r.emoji, !mine),
      }, r.emoji, ' ', String(r.by.length));
    })));
  }
  if (!m.deleted) el.append(actions(m, own));
  return el;
}

/** What a reply's quote shows of the message it answers. */
function quoteText(r) {
  if (r.excerpt) return r.excerpt;
  if (!r.sender) return 'not on this node';
  const q = view.msgs.get(r.id);
  if (q) return snippet(q);
  if (view.quotes.has(r.id)) return view.quotes.get(r.id);
  // The node gives no excerpt of a file or a deleted message: ask for the message once.
  view.quotes.set(r.id, '');
  api.get(api.g(view.gid, 'messages', r.id), { quiet: true }).then((m) => {
    view.quotes.set(r.id, snippet(m));
    for (const id of view.order) if (view.msgs.get(id).reply_to?.id === r.id) redraw(id);
  }).catch(() => {});
  return '';
}

/** A message in a few words: its first line, "Photo" or the file's name. */
function snippet(m) {
  if (m.deleted) return 'Deleted message';
  if (m.body.type === 'text') {
    const line = m.body.text.split('\n')[0];
    return line.length > 80 ? line.slice(0, 80) + '…' : line;
  }
  if (m.body.type === 'file') {
    const f = m.body.file;
    const what = isImage(f.mime) ? 'Photo' : f.name;
    return f.caption ? `${what}: ${f.caption}` : what;
  }
  return '';
}

function actions(m, own) {
  const bar = h('div', { class: 'actions', role: 'toolbar', 'aria-label': 'Message actions' },
    h('button', { type: 'button', class: 'icon', 'aria-label': 'Reply', title: 'Reply', onclick: () => setMode({ kind: 'reply', msg: m }) }, '↩'),
    h('button', { type: 'button', class: 'icon', 'aria-label': 'React', title: 'React', 'aria-haspopup': 'true', onclick: (e) => picker(m, e.currentTarget) }, '☺'));
  if (own && m.body.type === 'text') bar.append(h('button', { type: 'button', class: 'icon', 'aria-label': 'Edit', title: 'Edit', onclick: () => setMode({ kind: 'edit', msg: m }) }, '✎'));
  if (own) bar.append(h('button', { type: 'button', class: 'icon', 'aria-label': 'Delete', title: 'Delete', onclick: () => remove(m) }, '✗'));
  return bar;
}

/**
 * The open reaction picker: {id, pop, close}. It belongs to its message, not to the
 * message's element: a redraw of the message (a read receipt, a reaction, a profile)
 * moves it to the new element instead of taking it away from under the user.
 */
let openPicker = null;

function closePicker() {
  if (openPicker) openPicker.close();
}

function picker(m, anchor) {
  closePicker();
  const id = m.id;
  const mine = (e) => ((view.msgs.get(id) || m).reactions || []).some((r) => r.emoji === e && r.by.includes(app.me.peer_id));
  const pop = h('div', { class: 'picker', role: 'menu', 'aria-label': 'Pick a reaction' },
    REACTIONS.map((e) => h('button', {
      type: 'button', role: 'menuitem', class: mine(e) ? 'mine' : '', 'aria-label': e,
      onclick: () => { react(view.msgs.get(id) || m, e, !mine(e)).catch(() => {}); close(); },
    }, e)));
  // Removing the picker moves focus out of it, which fires focusout again: close once.
  let closed = false;
  const close = () => {
    if (closed) return;
    closed = true;
    if (openPicker && openPicker.pop === pop) openPicker = null;
    pop.remove();
  };
  openPicker = { id, pop, close, moving: false };
  pop.addEventListener('keydown', (e) => {
    if (e.key === 'Escape') { e.stopPropagation(); close(); document.querySelector(`#m-${id} button[aria-label="React"]`)?.focus(); }
  });
  pop.addEventListener('focusout', (e) => {
    if (openPicker && openPicker.pop === pop && openPicker.moving) return;
    if (!pop.contains(e.relatedTarget)) close();
  });
  anchor.closest('.msg').append(pop);
  pop.querySelector('button').focus();
}

function fileView(m) {
  const f = m.body.file;
  const done = f.state.status === 'complete';
  const wrap = h('div', { class: 'file', dataset: { file: f.id } });
  if (isImage(f.mime) && (f.thumbnail || done)) {
    const img = h('img', {
      class: 'thumb', alt: f.caption || f.name, loading: 'lazy',
      src: f.thumbnail ? api.g(view.gid, 'messages', m.id, 'file', 'thumbnail') : fileUrl(m),
    });
    if (f.width && f.height) {
      const scale = Math.min(1, 320 / f.width, 240 / f.height);
      img.width = Math.max(1, Math.round(f.width * scale));
      img.height = Math.max(1, Math.round(f.height * scale));
    }
    img.addEventListener('error', () => {
      if (done && img.src.endsWith('/thumbnail')) img.src = fileUrl(m);
      else img.replaceWith(h('div', { class: 'thumb placeholder muted' }, 'Picture'));
    }, { once: false });
    wrap.append(h('button', {
      type: 'button', class: 'thumb-button', 'aria-label': `View ${f.name} full size`,
      onclick: () => (done ? lightbox(m) : download(m)),
    }, img));
  }
  const status = f.state.status;
  const pct = f.size ? Math.floor((f.state.have_bytes / f.size) * 100) : 100;
  const card = h('div', { class: 'card' },
    h('span', { class: 'file-icon', 'aria-hidden': 'true' }, '▤'),
    h('span', { class: 'file-main' },
      h('span', { class: 'file-name' }, f.name),
      h('span', { class: 'muted' }, bytes(f.size),
        status === 'downloading' ? ` · ${pct}%` : '',
        status === 'waiting' ? ' · waiting for a member who has it' : '',
        status === 'evicted' ? ' · removed to save space' : '',
        status === 'deleted' ? ' · deleted' : '')));
  if (status === 'downloading' || status === 'waiting') {
    card.append(h('progress', { max: '100', value: String(pct), 'aria-label': `Downloading ${f.name}` }));
    card.append(h('button', { type: 'button', class: 'icon', 'aria-label': 'Stop download', title: 'Stop', onclick: () => api.del(api.g(view.gid, 'messages', m.id, 'file', 'download')).catch(() => {}) }, '■'));
  } else if (done) {
    card.append(h('a', { class: 'button', href: fileUrl(m), download: f.name, 'aria-label': `Save ${f.name}` }, 'Save'));
  } else if (status !== 'deleted') {
    card.append(h('button', { type: 'button', onclick: () => download(m), 'aria-label': `Download ${f.name}` }, 'Download'));
  }
  wrap.append(card);
  if (f.caption) wrap.append(h('div', { class: 'text' }, f.caption));
  return wrap;
}

function download(m) {
  api.post(api.g(view.gid, 'messages', m.id, 'file', 'download'), {}).catch(() => {});
}

function lightbox(m) {
  const f = m.body.file;
  const d = dialogShell(f.name,
    h('img', { class: 'full', src: fileUrl(m), alt: f.caption || f.name }),
    h('div', { class: 'actions' }, h('a', { class: 'button', href: fileUrl(m), download: f.name }, 'Save')));
  d.classList.add('lightbox');
  openDialog(d);
}

/** Redraws one message in place. */
function redraw(id) {
  const m = view.msgs.get(id);
  const old = document.getElementById('m-' + id);
  if (!m || !old) return;
  const focused = old.contains(document.activeElement) ? document.activeElement : null;
  const el = render(m);
  const p = openPicker && openPicker.id === id ? openPicker : null;
  if (p) {
    // Keep the open picker (and the focus in it) across the redraw.
    p.moving = true;
    el.append(p.pop);
    old.replaceWith(el);
    p.moving = false;
    if (focused && p.pop.contains(focused)) focused.focus();
    else if (focused) el.focus();
    return;
  }
  old.replaceWith(el);
  if (focused) el.focus();
}

async function jumpTo(id) {
  let el = document.getElementById('m-' + id);
  for (let i = 0; !el && !view.atStart && i < MAX_JUMP_PAGES; i++) {
    try {
      await older();
    } catch {
      break;
    }
    el = document.getElementById('m-' + id);
  }
  if (!el) { banner('That message is not on this node (too old, or it never arrived).', 'info'); return; }
  el.scrollIntoView({ block: 'center', behavior: 'smooth' });
  el.classList.add('flash');
  el.focus({ preventScroll: true });
  setTimeout(() => el.classList.remove('flash'), 1500);
}

// ---- actions ------------------------------------------------------------------------

async function react(m, emoji, on) {
  const path = api.g(view.gid, 'messages', m.id, 'reactions');
  const updated = on ? await api.post(path, { emoji }) : await api.del(path + '/' + encodeURIComponent(emoji));
  if (view.msgs.has(m.id)) { view.msgs.set(m.id, updated); redraw(m.id); }
}

async function remove(m) {
  if (!(await confirmDialog('Delete this message for everyone?', 'Delete'))) return;
  const updated = await api.del(api.g(view.gid, 'messages', m.id));
  if (view.msgs.has(m.id)) { view.msgs.set(m.id, updated); redraw(m.id); }
  if (view.mode && view.mode.msg.id === m.id) setMode(null);
}

function setMode(mode) {
  const wasEdit = view.mode && view.mode.kind === 'edit';
  view.mode = mode;
  const ctx = $('#context');
  ctx.hidden = !mode;
  if (!mode) {
    if (wasEdit) $('#text').value = '';
    return;
  }
  const m = mode.msg;
  const excerpt = snippet(m);
  fill($('#context-text'), h('strong', null, mode.kind === 'edit' ? 'Editing' : 'Replying to ' + nameOf(m.sender, m.sender_label)), ' ', h('span', { class: 'muted' }, excerpt));
  if (mode.kind === 'edit') $('#text').value = m.body.text;
  autosize();
  $('#text').focus();
}

async function submit() {
  const ta = $('#text');
  const text = ta.value;
  if (!text.trim() || !view.gid) return;
  const gid = view.gid;
  const mode = view.mode;
  $('#btn-send').disabled = true;
  try {
    if (mode && mode.kind === 'edit') {
      const updated = await api.patch(api.g(gid, 'messages', mode.msg.id), { text });
      if (view.msgs.has(updated.id)) { view.msgs.set(updated.id, updated); redraw(updated.id); }
    } else {
      const body = { text };
      if (mode && mode.kind === 'reply') body.reply_to = mode.msg.id;
      const sent = await api.post(api.g(gid, 'messages'), body);
      if (gid === view.gid) onMessage(sent);
    }
    ta.value = '';
    saveDraft(gid, '');
    view.mode = null;
    $('#context').hidden = true;
    autosize();
  } catch {
    // The banner shows the node's line; the text stays in the box.
  } finally {
    $('#btn-send').disabled = false;
    ta.focus();
  }
}

function editLast() {
  for (let i = view.order.length - 1; i >= 0; i--) {
    const m = view.msgs.get(view.order[i]);
    if (m.sender === app.me.peer_id && m.body.type === 'text' && !m.deleted) {
      setMode({ kind: 'edit', msg: m });
      return true;
    }
  }
  return false;
}

let lastTyping = 0;

function typing() {
  const now = Date.now();
  if (!view.gid || now - lastTyping < 3000) return;
  lastTyping = now;
  api.post(api.g(view.gid, 'typing'), {}, { quiet: true }).catch(() => {});
}

function autosize() {
  const ta = $('#text');
  ta.style.height = 'auto';
  ta.style.height = Math.min(ta.scrollHeight, 200) + 'px';
  ta.style.overflowY = ta.scrollHeight > 200 ? 'auto' : 'hidden';
}

const draft = (gid) => sessionStorage.getItem('kith.draft.' + gid) || '';
function saveDraft(gid, text) {
  if (text) sessionStorage.setItem('kith.draft.' + gid, text);
  else sessionStorage.removeItem('kith.draft.' + gid);
}

// ---- attachments --------------------------------------------------------------------

async function sendFiles(files) {
  const gid = view.gid;
  if (!gid) return;
  for (const file of files) {
    const bar = h('progress', { max: '100', value: '0', 'aria-label': `Uploading ${file.name}` });
    const row = h('div', { class: 'upload' }, h('span', { class: 'file-name' }, file.name), h('span', { class: 'muted' }, bytes(file.size)), bar);
    $('#uploads').append(row);
    try {
      const m = await api.upload(gid, file, '', (done, total) => { bar.value = Math.floor((done / total) * 100); });
      if (gid === view.gid) onMessage(m);
    } catch {
      // Reported in the banner.
    } finally {
      row.remove();
    }
  }
}

// ---- live events --------------------------------------------------------------------

/** A history entry arrived (or was sent here). */
export function onMessage(ev) {
  if (ev.group && ev.group !== view.gid) return;
  // An event carries `type: "message"` besides the message's own fields.
  const { type: _event, ...m } = ev;
  if (view.loading) {
    // The newest page is on its way and would replace what is drawn now: add it after.
    view.live.push(m);
    return;
  }
  const box = $('#messages');
  const stick = seesBottom() || m.sender === app.me.peer_id;
  const known = view.msgs.get(m.id);
  if (known && JSON.stringify(known) === JSON.stringify(m)) return;
  put(m);
  if (known) redraw(m.id);
  else box.append(render(m));
  view.typers.delete(m.sender);
  drawTyping();
  if (m.body.type === 'members_added' || m.body.type === 'members_removed') {
    // New members' names come with the group's member list.
    api.get(api.g(view.gid), { quiet: true }).then((g) => {
      if (g.id !== view.gid) return;
      view.info = g;
      notePeople(g.members);
      redraw(m.id);
    }).catch(() => {});
  }
  if (stick) box.scrollTop = box.scrollHeight;
  markRead();
}

/** A reaction, edit or delete. */
export function onChanged(d) {
  view.quotes.delete(d.id);
  if (!d.message || !view.msgs.has(d.id)) return;
  view.msgs.set(d.id, d.message);
  redraw(d.id);
  // Replies quoting an edited or deleted message show its new excerpt after a reload;
  // redraw the ones in view from the node's answer.
  if (d.change.type !== 'reaction') {
    for (const m of view.msgs.values()) {
      if (m.reply_to && m.reply_to.id === d.id) {
        api.get(api.g(view.gid, 'messages', m.id), { quiet: true }).then((fresh) => { view.msgs.set(m.id, fresh); redraw(m.id); }).catch(() => {});
      }
    }
  }
}

export function onEpoch() {
  drawHead();
  panels.refreshSide();
}

export function onProfile(d) {
  // Only what names that person is drawn again.
  const peer = d.profile.peer_id;
  for (const id of view.order) {
    const m = view.msgs.get(id);
    const b = m.body;
    if (m.sender === peer || m.reply_to?.sender?.peer_id === peer || (b.members || []).includes(peer)
      || (m.reactions || []).some((r) => r.by.includes(peer))) redraw(id);
  }
  panels.refreshSide();
}

export function onRead(d) {
  if (!view.msgs.has(d.up_to)) return;
  // read_by of every own message up to it may have grown: ask for the newest few again.
  // Only the messages whose read_by changed are drawn again.
  const gid = view.gid;
  api.get(api.g(gid, 'messages') + '?limit=' + Math.min(view.order.length, PAGE), { quiet: true }).then((list) => {
    if (gid !== view.gid) return;
    for (const m of list) {
      const known = view.msgs.get(m.id);
      if (known && JSON.stringify(known) !== JSON.stringify(m)) { view.msgs.set(m.id, m); redraw(m.id); }
    }
  }).catch(() => {});
}

export function onTyping(d) {
  const p = d.peer;
  if (p.peer_id === app.me.peer_id) return;
  clearTimeout(view.typers.get(p.peer_id)?.timer);
  view.typers.set(p.peer_id, { label: nameOf(p.peer_id, p.label), timer: setTimeout(() => { view.typers.delete(p.peer_id); drawTyping(); }, 5000) });
  drawTyping();
}

function drawTyping() {
  const names = [...view.typers.values()].map((t) => t.label);
  $('#typing').textContent = names.length === 0 ? '' : names.length === 1 ? `${names[0]} is typing…`
    : names.length === 2 ? `${names[0]} and ${names[1]} are typing…` : 'Several people are typing…';
}

export function onFileProgress(d) {
  const id = view.files.get(d.file);
  const m = id && view.msgs.get(id);
  if (!m || m.body.type !== 'file') return;
  m.body.file.state = d.state;
  redraw(id);
}

/** Join requests held on this node for the open group: a bar with approve / deny. */
export async function onRequests() {
  const gid = view.gid;
  if (!gid) return;
  let list = [];
  try {
    list = await api.get(api.g(gid, 'join-requests'), { quiet: true });
  } catch {
    return;
  }
  if (gid !== view.gid) return;
  const waiting = list.filter((r) => r.state === 'waiting');
  fill($('#requests'), waiting.map((r) => h('div', { class: 'request', role: 'status' },
    h('span', { class: 'grow' }, `${short(r.peer)} asks to join (request ${r.id.slice(0, 8)})`),
    h('button', { type: 'button', onclick: () => answer(r, 'approve') }, 'Approve'),
    h('button', { type: 'button', class: 'danger', onclick: () => answer(r, 'deny') }, 'Deny'))));
}

async function answer(r, verb) {
  try {
    await api.post(api.g(view.gid, 'join-requests', r.id, verb), {});
  } finally {
    onRequests();
  }
}

// ---- wiring -------------------------------------------------------------------------

/** Attaches the chat view's handlers (once). */
export function wire() {
  const ta = $('#text');
  $('#composer').addEventListener('submit', (e) => { e.preventDefault(); submit(); });
  ta.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      submit();
    } else if (e.key === 'Escape' && view.mode) {
      e.preventDefault();
      setMode(null);
    } else if (e.key === 'ArrowUp' && !ta.value && !e.altKey) {
      if (editLast()) e.preventDefault();
    }
  });
  ta.addEventListener('input', () => {
    autosize();
    if (view.gid) saveDraft(view.gid, view.mode && view.mode.kind === 'edit' ? '' : ta.value);
    if (ta.value) typing();
  });
  ta.addEventListener('paste', (e) => {
    const files = [...(e.clipboardData?.files || [])];
    if (files.length) { e.preventDefault(); sendFiles(files); }
  });
  $('#context-cancel').addEventListener('click', () => setMode(null));
  $('#btn-attach').addEventListener('click', () => $('#file').click());
  $('#file').addEventListener('change', (e) => {
    const files = [...e.target.files];
    e.target.value = '';
    sendFiles(files);
  });
  $('#btn-invite').addEventListener('click', () => panels.inviteDialog(view.gid));
  $('#btn-members').addEventListener('click', () => panels.toggleSide(view.gid));
  const box = $('#messages');
  box.addEventListener('scroll', () => { olderOnScroll(); markRead(); });
  document.addEventListener('visibilitychange', markRead);
  window.addEventListener('focus', markRead);
  const cv = $('#chat-view');
  const drop = $('#drop');
  let depth = 0;
  const hasFiles = (e) => [...(e.dataTransfer?.types || [])].includes('Files');
  cv.addEventListener('dragenter', (e) => { if (hasFiles(e)) { depth++; drop.hidden = false; } });
  cv.addEventListener('dragleave', () => { if (--depth <= 0) { depth = 0; drop.hidden = true; } });
  cv.addEventListener('dragover', (e) => { if (hasFiles(e)) e.preventDefault(); });
  cv.addEventListener('drop', (e) => {
    depth = 0;
    drop.hidden = true;
    if (!hasFiles(e)) return;
    e.preventDefault();
    sendFiles([...e.dataTransfer.files]);
  });
  renderList();
}
