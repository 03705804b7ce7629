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
  /** id -> {s: GroupSummary} as the node last answered GET /v1/groups. */
  groups: new Map(),
  /** Groups this node is no longer in: id -> 'left' | 'removed' | null (not known). */
  gone: new Map(),
  /** Groups this browser asked to leave (so their removal reads "You left"). */
  leaving: new Set(),
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

/** Takes the names and labels the node gives with a group's members (no request each). */
export function notePeople(members) {
  for (const m of members) {
    const known = app.profiles.get(m.peer_id);
    if (!known || !known.version) app.profiles.set(m.peer_id, { ...known, peer_id: m.peer_id, name: m.name, label: m.label || short(m.peer_id) });
  }
}

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

let refreshTimer = null;
let refreshing = null;
let refreshAgain = false;

/** Reads the chats list again soon: many events in a row make one request. */
export function scheduleRefresh(delay = 150) {
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => {
    refreshTimer = null;
    refreshGroups().catch(() => {});
  }, delay);
}

function displayName(s) {
  return s.direct ? s.direct.label || s.direct.name || s.name : s.name;
}
export { displayName };

const activity = (g) => (g.s.last_message ? g.s.last_message.received_at_ms : 0);

function sortedGroups() {
  return [...app.groups.values()].sort((a, b) => (b.s.active !== false) - (a.s.active !== false)
    || (activity(b) - activity(a)) || displayName(a.s).localeCompare(displayName(b.s)));
}

/** The unread count to show for a group: none while the user reads it on screen. */
function unreadOf(g) {
  if (g.s.id === app.current && chat.reading()) return 0;
  return g.s.unread || 0;
}

/** What the list says of a group this node is no longer in. */
export function goneText(gid) {
  const why = app.gone.get(gid);
  return why === 'left' ? 'You left' : why === 'removed' ? 'You were removed' : 'You are no longer a member';
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
    const unread = unreadOf(g);
    const gone = g.s.active === false;
    const li = h('li', {
      role: 'option', tabindex: selected || (!app.current && g === items[0]) ? '0' : '-1',
      'aria-selected': selected ? 'true' : 'false', class: 'chat-item' + (unread ? ' unread' : '') + (gone ? ' gone' : ''),
      dataset: { id: g.s.id },
      'aria-label': name + (gone ? `, ${goneText(g.s.id)}` : '') + (unread ? `, ${badge(unread)} unread` : ''),
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
        h('span', { class: 'chat-time muted' }, when(activity(g)))),
      h('span', { class: 'chat-bottom' },
        h('span', { class: 'chat-preview muted' }, gone ? goneText(g.s.id) : preview(g.s.last_message)),
        unread ? h('span', { class: 'badge', 'aria-hidden': 'true' }, badge(unread)) : null)));
    return li;
  }));
  if (!items.length) ul.append(h('li', { class: 'muted none' }, filter ? 'No chat matches.' : 'No chats yet.'));
  if (hadFocus) ul.querySelector(`[data-id="${CSS.escape(hadFocus)}"]`)?.focus();
  const total = [...app.groups.values()].reduce((n, g) => n + unreadOf(g), 0);
  document.title = total ? `(${badge(total)}) Kith` : 'Kith';
}

/** The node counts unread messages up to 1000: more shows as 999+. */
const badge = (n) => (n > 999 ? '999+' : String(n));

export function initials(name) {
  const parts = String(name).trim().split(/\s+/).filter(Boolean);
  const s = parts.length > 1 ? parts[0][0] + parts[1][0] : (parts[0] || '?').slice(0, 2);
  return s.toUpperCase();
}

/**
 * Reads the chats list from the node (unread counts, last messages, who left). One request
 * at a time; a call while one runs asks for one more after it, so the list ends up current.
 */
export async function refreshGroups() {
  if (refreshing) {
    refreshAgain = true;
    return refreshing;
  }
  refreshing = (async () => {
    try {
      do {
        refreshAgain = false;
        const list = await api.get('/v1/groups', { quiet: true });
        const seen = new Set();
        for (const s of list) {
          seen.add(s.id);
          const g = app.groups.get(s.id);
          if (g) g.s = s;
          else app.groups.set(s.id, { s });
          if (s.active === false && !app.gone.has(s.id)) goneReason(s.id);
        }
        for (const id of [...app.groups.keys()]) if (!seen.has(id)) app.groups.delete(id);
        renderList();
        if (app.current) chat.onSummary();
      } while (refreshAgain);
    } finally {
      refreshing = null;
    }
  })();
  return refreshing;
}

/** Finds whether this node left `gid` or was removed: the newest entry removing it. */
async function goneReason(gid) {
  app.gone.set(gid, null);
  try {
    const hist = await api.get(api.g(gid, 'messages') + '?limit=50', { quiet: true });
    noteGone(gid, hist);
  } catch {
    // The list says "no longer a member".
  }
}

/** Notes from history entries whether this node left `gid` or was removed from it. */
export function noteGone(gid, entries) {
  for (let i = entries.length - 1; i >= 0; i--) {
    const b = entries[i].body;
    if (b.type === 'members_removed' && b.members.includes(app.me.peer_id)) {
      // A member commits a leave: the entry's sender is then that member, and the leave
      // was asked for here. Without a record of that, only "removed by itself" is a leave.
      const left = entries[i].sender === app.me.peer_id || app.leaving.has(gid);
      app.gone.set(gid, left ? 'left' : 'removed');
      renderList();
      return;
    }
  }
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
    case 'message': {
      const b = d.body;
      if (b.type === 'members_removed' && b.members.includes(app.me.peer_id)) noteGone(d.group, [d]);
      if (d.group === app.current) chat.onMessage(d);
      scheduleRefresh();
      break;
    }
    case 'group_joined':
    case 'epoch_changed':
      if (type === 'epoch_changed' && d.group === app.current) chat.onEpoch(d);
      scheduleRefresh();
      break;
    case 'message_changed':
      if (d.group === app.current) chat.onChanged(d);
      // An edit or delete of the newest message changes the list's preview.
      if (d.change.type !== 'reaction') scheduleRefresh();
      break;
    case 'profile_updated':
      app.profiles.set(d.profile.peer_id, d.profile);
      if (d.profile.peer_id === app.me.peer_id) { app.me = { ...app.me, ...d.profile }; drawMe(); }
      if (d.group === app.current) chat.onProfile(d);
      break;
    case 'read':
      if (d.group === app.current) chat.onRead(d);
      if (d.peer === app.me.peer_id) scheduleRefresh();
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
      scheduleRefresh(0);
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
