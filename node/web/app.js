// Kith web app: start-up, the chats list, the event stream and the keyboard.
// The chat view is in chat.js, dialogs and side panels in panels.js.

import * as api from './api.js';
import { h, fill, $, when, short } from './dom.js';
import * as chat from './chat.js';
import * as panels from './panels.js';

/** State shared by the views. */
export const app = {
  /** This node: {peer_id, name?, label}. */
  me: null,
  /** id -> {s: GroupSummary, last: Message|null, unread: number, activity: ms}. */
  groups: new Map(),
  /** The open group's id, or null. */
  current: null,
  /** PeerId -> Profile / Person ({name?, label}). */
  profiles: new Map(),
  /** Functions told of every event: (type, data). */
  hooks: new Set(),
};

// ---- errors -------------------------------------------------------------------------

/** Shows one line in the dismissable banner at the top. */
export function banner(text, kind = 'error') {
  const b = $('#banner');
  $('#banner-text').textContent = text;
  b.className = kind;
  b.hidden = false;
}

function hideBanner() {
  $('#banner').hidden = true;
}

// ---- names --------------------------------------------------------------------------

/** What to show for a member: "You", their label, or the end of their PeerId. */
export function nameOf(peer, fallbackLabel) {
  if (app.me && peer === app.me.peer_id) return 'You';
  const p = app.profiles.get(peer);
  return (p && (p.label || p.name)) || fallbackLabel || short(peer);
}

/** Fetches the profiles of `peers` not known yet (404: the member set none). */
export async function loadProfiles(peers) {
  const missing = peers.filter((p) => !app.profiles.has(p));
  await Promise.all(missing.map(async (p) => {
    try {
      app.profiles.set(p, await api.get('/v1/profiles/' + encodeURIComponent(p), { quiet: true }));
    } catch {
      app.profiles.set(p, { label: short(p) });
    }
  }));
}

// ---- read marks (kept in this browser: the API has no own read mark to read back) ----

function readMark(gid) {
  return Number(localStorage.getItem('kith.read.' + gid) || 0);
}

/** Notes that the user saw `gid` up to `ms` (a message's received_at_ms). */
export function setReadMark(gid, ms) {
  if (ms > readMark(gid)) localStorage.setItem('kith.read.' + gid, String(ms));
  const g = app.groups.get(gid);
  if (g && g.unread) {
    g.unread = 0;
    renderList();
  }
}

const counts = (m) => m.body && (m.body.type === 'text' || m.body.type === 'file') && !m.deleted;

/** A one-line preview of a history entry for the chats list. */
export function preview(m) {
  if (!m) return '';
  const b = m.body;
  if (m.deleted) return 'Message deleted';
  const who = m.sender === app.me?.peer_id ? 'You: ' : '';
  switch (b.type) {
    case 'text': return who + b.text.split('\n')[0];
    case 'file': return who + '📎 ' + (b.file.caption || b.file.name);
    default: return systemText(m);
  }
}

/** Words for a membership or invite entry of history. */
export function systemText(m) {
  const b = m.body;
  const by = nameOf(m.sender, m.sender_label);
  const list = (ps) => ps.map((p) => nameOf(p)).join(', ');
  switch (b.type) {
    case 'group_created': return `${by} created the group “${b.name}”`;
    case 'members_added':
      if (app.me && b.members.includes(app.me.peer_id)) return m.sender === app.me.peer_id ? 'You joined' : `${by} added you`;
      return `${by} added ${list(b.members)}`;
    case 'members_removed':
      if (b.members.length === 1 && b.members[0] === m.sender) return `${by} left`;
      return `${by} removed ${list(b.members)}`;
    case 'invite_created': return `${by} created an invite (${b.max_uses} use${b.max_uses === 1 ? '' : 's'}${b.approval ? ', with approval' : ''})`;
    case 'invite_revoked': return `${by} revoked an invite`;
    default: return '';
  }
}

// ---- chats list ---------------------------------------------------------------------

/** Records a history entry of `gid` for the list: last message, activity, unread. */
export function noteMessage(gid, m, { live = false } = {}) {
  const g = app.groups.get(gid);
  if (!g) return;
  if (!g.last || m.received_at_ms >= g.last.received_at_ms) {
    g.last = m;
    g.activity = m.received_at_ms;
  }
  if (live && counts(m) && m.sender !== app.me.peer_id && m.received_at_ms > readMark(gid)
      && !(gid === app.current && chat.seesBottom())) {
    g.unread++;
  }
  renderList();
}

function displayName(s) {
  return s.direct ? s.direct.label || s.direct.name || s.name : s.name;
}
export { displayName };

function sortedGroups() {
  return [...app.groups.values()].sort((a, b) => (b.activity - a.activity) || displayName(a.s).localeCompare(displayName(b.s)));
}

let renderQueued = false;

/** Redraws the chats list (batched to one redraw per frame). */
export function renderList() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    drawList();
  });
}

function drawList() {
  const ul = $('#chats');
  const filter = $('#filter').value.trim().toLowerCase();
  const hadFocus = ul.contains(document.activeElement) ? document.activeElement.dataset.id : null;
  const items = sortedGroups().filter((g) => !filter || displayName(g.s).toLowerCase().includes(filter));
  fill(ul, items.map((g) => {
    const name = displayName(g.s);
    const selected = g.s.id === app.current;
    const li = h('li', {
      role: 'option', tabindex: selected || (!app.current && g === items[0]) ? '0' : '-1',
      'aria-selected': selected ? 'true' : 'false', class: 'chat-item' + (g.unread ? ' unread' : ''),
      dataset: { id: g.s.id },
      'aria-label': name + (g.unread ? `, ${g.unread} unread` : ''),
      onclick: () => openChat(g.s.id),
      onkeydown: (e) => {
        if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); openChat(g.s.id); }
        if (e.key === 'ArrowDown' || e.key === 'ArrowUp') {
          e.preventDefault();
          const sib = e.key === 'ArrowDown' ? li.nextElementSibling : li.previousElementSibling;
          if (sib) sib.focus();
        }
      },
    },
    h('span', { class: 'avatar', 'aria-hidden': 'true' }, initials(name)),
    h('span', { class: 'chat-main' },
      h('span', { class: 'chat-top' },
        h('span', { class: 'chat-name' }, name),
        h('span', { class: 'chat-time muted' }, when(g.activity))),
      h('span', { class: 'chat-bottom' },
        h('span', { class: 'chat-preview muted' }, preview(g.last)),
        g.unread ? h('span', { class: 'badge', 'aria-hidden': 'true' }, g.unread > 99 ? '99+' : String(g.unread)) : null)));
    return li;
  }));
  if (!items.length) ul.append(h('li', { class: 'muted none' }, filter ? 'No chat matches.' : 'No chats yet.'));
  if (hadFocus) ul.querySelector(`[data-id="${CSS.escape(hadFocus)}"]`)?.focus();
  const total = [...app.groups.values()].reduce((n, g) => n + g.unread, 0);
  document.title = total ? `(${total}) Kith` : 'Kith';
}

export function initials(name) {
  const parts = String(name).trim().split(/\s+/).filter(Boolean);
  const s = parts.length > 1 ? parts[0][0] + parts[1][0] : (parts[0] || '?').slice(0, 2);
  return s.toUpperCase();
}

/** Reads the group list (and the newest entries of each) again. */
export async function refreshGroups() {
  const list = await api.get('/v1/groups');
  const seen = new Set();
  await Promise.all(list.map(async (s) => {
    seen.add(s.id);
    let g = app.groups.get(s.id);
    if (!g) {
      g = { s, last: null, unread: 0, activity: 0 };
      app.groups.set(s.id, g);
      try {
        const hist = await api.get(api.g(s.id, 'messages') + '?limit=50', { quiet: true });
        const mark = readMark(s.id);
        g.unread = hist.filter((m) => counts(m) && m.sender !== app.me.peer_id && m.received_at_ms > mark).length;
        const last = hist[hist.length - 1];
        if (last) { g.last = last; g.activity = last.received_at_ms; }
      } catch {
        // The list still shows the group; its chat view reports the error when opened.
      }
    } else {
      g.s = s;
    }
  }));
  for (const id of [...app.groups.keys()]) if (!seen.has(id)) app.groups.delete(id);
  renderList();
}

/** Opens a chat (and remembers it in the address, so a reload comes back to it). */
export function openChat(gid) {
  if (location.hash !== '#/g/' + gid) {
    location.hash = '#/g/' + gid;
    return; // hashchange opens it
  }
  showChat(gid);
}

function showChat(gid) {
  if (!app.groups.has(gid)) {
    gid = null;
  }
  app.current = gid;
  document.body.classList.toggle('in-chat', !!gid);
  renderList();
  chat.open(gid);
}

function route() {
  const m = /^#\/g\/([0-9a-f]+)$/.exec(location.hash);
  showChat(m ? m[1] : null);
}

/** Leaves the open chat (narrow window: back to the list). */
export function closeChat() {
  history.replaceState(null, '', location.pathname);
  showChat(null);
  $('#chats [aria-selected="true"], #chats li')?.focus();
}

function step(delta) {
  const items = sortedGroups();
  if (!items.length) return;
  const i = items.findIndex((g) => g.s.id === app.current);
  const next = items[(i + delta + items.length) % items.length] || items[0];
  openChat(next.s.id);
}

// ---- the event stream ---------------------------------------------------------------

function onEvent(type, d) {
  switch (type) {
    case 'message':
      noteMessage(d.group, d, { live: true });
      if (d.group === app.current) chat.onMessage(d);
      if (d.body.type === 'members_added' || d.body.type === 'members_removed') refreshGroups().catch(() => {});
      break;
    case 'group_joined':
      refreshGroups().catch(() => {});
      break;
    case 'epoch_changed': {
      const g = app.groups.get(d.group);
      if (g) { g.s.member_count = d.member_count; g.s.epoch = d.epoch; }
      if (d.group === app.current) chat.onEpoch(d);
      break;
    }
    case 'message_changed': {
      const g = app.groups.get(d.group);
      if (g && d.message && g.last && g.last.id === d.id) { g.last = d.message; renderList(); }
      if (d.group === app.current) chat.onChanged(d);
      break;
    }
    case 'profile_updated':
      app.profiles.set(d.profile.peer_id, d.profile);
      if (d.profile.peer_id === app.me.peer_id) { app.me = { ...app.me, ...d.profile }; drawMe(); }
      if (d.group === app.current) chat.onProfile(d);
      break;
    case 'read':
      if (d.group === app.current) chat.onRead(d);
      break;
    case 'typing':
      if (d.group === app.current) chat.onTyping(d);
      break;
    case 'file_progress':
      if (d.group === app.current) chat.onFileProgress(d);
      break;
    case 'join_request_held': {
      const g = app.groups.get(d.group);
      if (d.group === app.current) chat.onRequests();
      else banner(`${short(d.peer)} asks to join ${g ? displayName(g.s) : 'a group'}: open it to approve or deny`, 'info');
      break;
    }
    case 'verification_lost':
      banner(d.message, 'warn');
      break;
    case 'lagged':
      refreshGroups().catch(() => {});
      if (app.current) chat.reload();
      break;
    default:
      break;
  }
  for (const f of app.hooks) f(type, d);
}

function onStream(open) {
  const c = $('#conn');
  c.textContent = open ? '' : 'Reconnecting to the node…';
  c.classList.toggle('warn', !open);
}

// ---- profile button -----------------------------------------------------------------

export function drawMe() {
  const name = app.me.name || 'Set your name';
  fill($('#me'), h('span', { class: 'avatar small', 'aria-hidden': 'true' }, initials(app.me.name || '?')), h('span', null, name));
  if (app.me.avatar) {
    const img = h('img', { class: 'avatar small', alt: '', src: '/v1/profiles/' + encodeURIComponent(app.me.peer_id) + '/avatar?v=' + (app.me.version || 0) });
    $('#me').firstChild.replaceWith(img);
  }
}

// ---- start --------------------------------------------------------------------------

function showLogin() {
  $('#loading').hidden = true;
  $('#app').hidden = true;
  $('#login').hidden = false;
  $('#login-failed').hidden = new URLSearchParams(location.search).get('login') !== 'failed';
}

let stream = null;

async function start() {
  $('#banner-close').addEventListener('click', hideBanner);
  api.on('error', (e) => banner(e.message));
  api.on('unauthorized', () => {
    if (stream) stream.close();
    showLogin();
  });
  try {
    await api.get('/v1/web/session', { quiet: true });
  } catch (e) {
    if (e.status !== 401) banner(e.message);
    showLogin();
    return;
  }
  if (location.search) history.replaceState(null, '', location.pathname + location.hash);
  const status = await api.get('/v1/status');
  app.me = { peer_id: status.peer_id, name: status.name, label: short(status.peer_id) };
  try {
    const p = await api.get('/v1/profile', { quiet: true });
    if (p) app.me = { ...app.me, ...p };
  } catch {
    // No profile yet.
  }
  drawMe();
  stream = api.events(onEvent, onStream);
  await refreshGroups();
  $('#loading').hidden = true;
  $('#app').hidden = false;
  wire();
  route();
  if (!app.me.name) banner('Tip: set your name so others see who you are (click “Set your name”).', 'info');
}

function wire() {
  window.addEventListener('hashchange', route);
  $('#filter').addEventListener('input', renderList);
  $('#filter').addEventListener('keydown', (e) => {
    if (e.key === 'Enter') {
      const first = $('#chats li[data-id]');
      if (first) { openChat(first.dataset.id); $('#filter').value = ''; renderList(); }
    } else if (e.key === 'ArrowDown') {
      e.preventDefault();
      $('#chats li[data-id]')?.focus();
    } else if (e.key === 'Escape') {
      $('#filter').value = '';
      renderList();
    }
  });
  $('#btn-new').addEventListener('click', panels.newGroup);
  $('#btn-join').addEventListener('click', () => panels.joinDialog());
  $('#btn-status').addEventListener('click', panels.statusDialog);
  $('#me').addEventListener('click', panels.profileDialog);
  $('#back').addEventListener('click', closeChat);
  chat.wire();
  document.addEventListener('keydown', (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === 'k') {
      e.preventDefault();
      document.body.classList.remove('in-chat');
      $('#filter').focus();
      $('#filter').select();
    } else if (e.altKey && (e.key === 'ArrowUp' || e.key === 'ArrowDown')) {
      e.preventDefault();
      step(e.key === 'ArrowDown' ? 1 : -1);
    }
  });
}

start().catch((e) => banner(e.message || String(e)));
