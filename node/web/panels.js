// Dialogs and the members panel: new group, join, invite, members and verify, profile,
// node status.

import * as api from './api.js';
import { h, fill, $, bytes, when, short, openDialog, dialogShell, confirmDialog } from './dom.js';
import { app, nameOf, notePeople, openChat, refreshGroups, drawMe, displayName, closeChat } from './app.js';

/** A QR code of `text` from the node, as an <img> (blob URL, freed when it leaves the page). */
async function qr(text, label) {
  const img = h('img', { class: 'qr', alt: label });
  const blob = await api.call('POST', '/v1/qr', { text }, { as: 'blob' });
  const url = URL.createObjectURL(blob);
  img.src = url;
  img.addEventListener('load', () => setTimeout(() => URL.revokeObjectURL(url), 0), { once: true });
  return img;
}

function field(label, input, hint) {
  return h('label', { class: 'field' }, h('span', null, label), input, hint ? h('small', { class: 'muted' }, hint) : null);
}

async function copy(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const ta = h('textarea', { class: 'offscreen' }, text);
    document.body.append(ta);
    ta.select();
    document.execCommand('copy');
    ta.remove();
  }
  const was = button.textContent;
  button.textContent = 'Copied';
  setTimeout(() => { button.textContent = was; }, 1500);
}

// ---- new group ----------------------------------------------------------------------

export async function newGroup() {
  const name = h('input', { name: 'name', required: true, maxlength: '128', autofocus: true, placeholder: 'Book club' });
  const form = h('form', { class: 'stack' },
    field('Group name', name),
    h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'primary' }, 'Create')));
  const d = dialogShell('New group', form);
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    try {
      const g = await api.post('/v1/groups', { name: name.value.trim() });
      await refreshGroups();
      d.close('ok');
      openChat(g.id);
    } catch {
      // Banner.
    }
  });
  await openDialog(d);
}

// ---- join ---------------------------------------------------------------------------

const STAGES = {
  finding_members: (s) => `Looking for members of the group (up to ${s.timeout_secs} s)`,
  contacting: (s) => `Contacting ${short(s.peer)} (${s.via === 'dht' ? 'found in the DHT' : 'the inviter'})`,
  request_sent: (s) => `Asked ${short(s.peer)} to add this node`,
  trying_next: (s) => `${short(s.peer)} could not help (${s.reason}); trying the next member`,
  awaiting_approval: (s) => `Waiting for a member to approve (request ${s.request.slice(0, 8)})`,
  added: (s) => `${short(s.peer)} added this node; setting up the group`,
  ready: (s) => `Ready: ${s.member_count} members`,
  rejoining: () => 'A concurrent change won; joining again with the same link',
  lost: (s) => `Joining again was refused: ${s.reason}`,
};

export async function joinDialog(prefill = '') {
  const link = h('textarea', { name: 'link', rows: '3', required: true, autofocus: true, placeholder: 'kith1… or kith://join#kith1…', spellcheck: 'false' }, prefill);
  const stages = h('ol', { class: 'stages', 'aria-live': 'polite', 'aria-label': 'Join progress' });
  const result = h('p', { class: 'result', role: 'status' });
  const go = h('button', { type: 'submit', class: 'primary' }, 'Join');
  const form = h('form', { class: 'stack' }, field('Invite link', link, 'Paste the link someone sent you.'),
    h('div', { class: 'actions' }, go), stages, result);
  const d = dialogShell('Join a group', form);
  d.classList.add('join');
  const hook = (type, ev) => {
    if (type !== 'join_progress') return;
    const f = STAGES[ev.stage.kind];
    stages.append(h('li', { class: 'stage ' + ev.stage.kind, dataset: { kind: ev.stage.kind } }, f ? f(ev.stage) : ev.stage.kind));
  };
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    go.disabled = true;
    link.readOnly = true;
    fill(stages);
    result.textContent = '';
    result.className = 'result';
    // Kept until the dialog closes: the last stage's event may come after the answer.
    app.hooks.add(hook);
    try {
      const g = await api.post('/v1/join', { link: link.value.trim() }, { quiet: true });
      result.textContent = `Joined “${g.name}”.`;
      result.classList.add('ok');
      await refreshGroups();
      const open = h('button', { type: 'button', id: 'join-open', class: 'primary', autofocus: true, onclick: () => { d.close('ok'); openChat(g.id); } }, 'Open the chat');
      form.append(h('div', { class: 'actions' }, open));
      open.focus();
    } catch (err) {
      result.textContent = err.message;
      result.classList.add('fail');
      go.disabled = false;
      link.readOnly = false;
    }
  });
  await openDialog(d);
  app.hooks.delete(hook);
}

// ---- invite -------------------------------------------------------------------------

export async function inviteDialog(gid) {
  if (!gid) return;
  const g = app.groups.get(gid);
  const expiry = h('select', { name: 'expiry' },
    [['3600', '1 hour'], ['86400', '24 hours'], ['604800', '7 days'], ['2592000', '30 days']].map(([v, t]) => h('option', { value: v, selected: v === '86400' }, t)));
  const uses = h('input', { name: 'uses', type: 'number', min: '1', max: '1000', value: '1', required: true });
  const approval = h('input', { name: 'approval', type: 'checkbox' });
  const out = h('div', { class: 'invite-out' });
  const list = h('ul', { class: 'invites', 'aria-label': 'Invites of this group' });
  const form = h('form', { class: 'stack' },
    h('div', { class: 'row' }, field('Expires after', expiry), field('Uses', uses)),
    h('label', { class: 'check' }, approval, h('span', null, 'A member approves each join')),
    h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'primary' }, 'Create link')));
  const d = dialogShell(`Invite to ${g ? displayName(g.s) : 'the group'}`, form, out, h('h3', null, 'Invites'), list);
  d.classList.add('invite');
  const drawList = async () => {
    const all = await api.get(api.g(gid, 'invites'));
    fill(list, all.length ? all.map((i) => h('li', { class: 'invite-row ' + i.state },
      h('span', { class: 'grow' },
        h('code', null, i.id.slice(0, 8)), ' ',
        h('span', { class: 'state' }, i.state.replace('_', ' ')),
        h('span', { class: 'muted' }, ` · ${i.uses}/${i.max_uses} used · expires ${new Date(i.expires_at * 1000).toLocaleString()}${i.approval ? ' · approval' : ''}`)),
      i.state === 'active' ? h('button', {
        type: 'button', class: 'danger', 'aria-label': `Revoke invite ${i.id.slice(0, 8)}`,
        onclick: async () => { await api.del(api.g(gid, 'invites', i.id)); drawList(); },
      }, 'Revoke') : null)) : h('li', { class: 'muted' }, 'No invites yet.'));
  };
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    try {
      const inv = await api.post(api.g(gid, 'invites'), {
        expires_in_secs: Number(expiry.value), max_uses: Number(uses.value), approval: approval.checked,
      });
      const text = h('input', { class: 'link', readonly: true, value: inv.link, 'aria-label': 'Invite link' });
      const btn = h('button', { type: 'button', class: 'primary', onclick: (ev) => copy(inv.link, ev.currentTarget) }, 'Copy');
      fill(out, h('div', { class: 'row' }, text, btn),
        inv.leaves_lan === false ? h('p', { class: 'warn' }, 'This link only works on your local network until this node is reachable from outside.') : null,
        await qr(inv.url || inv.link, 'QR code of the invite link'),
        h('p', { class: 'muted' }, `Valid until ${new Date(inv.expires_at * 1000).toLocaleString()}, ${inv.max_uses} use${inv.max_uses === 1 ? '' : 's'}${inv.approval ? ', each approved by a member' : ''}.`));
      text.select();
      drawList();
    } catch {
      // Banner.
    }
  });
  drawList().catch(() => {});
  await openDialog(d);
}

// ---- members panel ------------------------------------------------------------------

let sideGroup = null;

export function closeSide() {
  sideGroup = null;
  $('#side').hidden = true;
  document.body.classList.remove('in-side');
  $('#btn-members').setAttribute('aria-expanded', 'false');
}

export function toggleSide(gid) {
  if (sideGroup === gid) { closeSide(); return; }
  sideGroup = gid;
  $('#side').hidden = false;
  document.body.classList.add('in-side');
  $('#btn-members').setAttribute('aria-expanded', 'true');
  refreshSide().then(() => $('#side button')?.focus());
}

export async function refreshSide() {
  const gid = sideGroup;
  if (!gid) return;
  const group = await api.get(api.g(gid));
  if (gid !== sideGroup) return;
  notePeople(group.members);
  const side = $('#side');
  const rows = group.members.map((m) => h('li', { class: 'member' },
    h('span', { class: 'grow' },
      h('span', { class: 'member-name' }, m.is_self ? `You (${short(m.peer_id)})` : nameOf(m.peer_id)),
      m.verified ? h('span', { class: 'verified', title: 'Verified' }, ' ✔ verified') : null,
      m.key_changed ? h('span', { class: 'warn' }, ' key changed') : null),
    m.is_self ? null : h('span', { class: 'member-actions' },
      h('button', { type: 'button', onclick: () => verifyDialog(gid, m.peer_id) }, 'Verify'),
      h('button', { type: 'button', onclick: () => direct(m.peer_id) }, 'Message'),
      h('button', { type: 'button', class: 'danger', onclick: () => removeMember(gid, m.peer_id) }, 'Remove'))));
  fill(side,
    h('header', { class: 'bar' },
      h('h2', { class: 'grow' }, `Members (${group.members.length})`),
      h('button', { type: 'button', class: 'icon close', 'aria-label': 'Close members', onclick: closeSide }, '×')),
    group.active === false ? h('p', { class: 'warn' }, 'You are no longer a member of this group.') : null,
    group.leaving ? h('p', { class: 'warn' }, 'Leaving: waiting for a member to confirm.') : null,
    h('ul', { class: 'members' }, rows),
    h('div', { class: 'actions' },
      h('button', { type: 'button', onclick: () => inviteDialog(gid) }, 'Invite'),
      group.active !== false && !group.leaving ? h('button', { type: 'button', class: 'danger', onclick: () => leave(gid) }, 'Leave group') : null));
}

async function removeMember(gid, peer) {
  if (!(await confirmDialog(`Remove ${nameOf(peer)} from the group? They will read nothing sent after this.`, 'Remove'))) return;
  await api.del(api.g(gid, 'members', peer));
  refreshSide();
}

async function leave(gid) {
  if (!(await confirmDialog('Leave this group? You will not get its messages any more.', 'Leave'))) return;
  app.leaving.add(gid);
  await api.post(api.g(gid, 'leave'), {});
  await refreshGroups();
  refreshSide();
}

async function direct(peer) {
  const r = await api.post('/v1/direct', { peer });
  await refreshGroups();
  closeSide();
  openChat(r.group.id);
}

/** The safety number as 12 groups of 5 digits on 3 lines. */
function digits(n) {
  const groups = n.match(/.{1,5}/g) || [];
  return h('div', { class: 'safety', 'aria-label': 'Safety number' },
    [0, 1, 2].map((line) => h('div', null, groups.slice(line * 4, line * 4 + 4).join(' '))));
}

export async function verifyDialog(gid, peer) {
  const body = h('div', { class: 'stack' });
  const d = dialogShell(`Verify ${nameOf(peer)}`, body);
  d.classList.add('verify');
  const draw = async () => {
    const v = await api.get(api.g(gid, 'members', peer, 'verification'));
    const p = app.profiles.get(peer);
    fill(body,
      h('p', null, 'Compare these numbers with ', nameOf(peer), ' in person or on a call you trust. If they match on both screens, mark them verified.'),
      digits(v.safety_number),
      await qr(v.qr_payload, 'QR code to compare the safety number'),
      v.key_changed ? h('p', { class: 'warn' }, v.key_changed.message) : null,
      h('p', { class: v.verified ? 'ok' : 'muted' }, v.verified ? `Verified ${when(v.verified_at_ms)}${v.name ? ' as ' + v.name : ''}.` : 'Not verified.'),
      h('div', { class: 'actions' },
        v.verified || v.verified_at_ms ? h('button', { type: 'button', onclick: async () => { await api.del(api.g(gid, 'members', peer, 'verification')); draw(); refreshSide(); } }, 'Remove mark') : null,
        v.verified ? null : h('button', {
          type: 'button', class: 'primary',
          onclick: async () => { await api.put(api.g(gid, 'members', peer, 'verification'), p && p.name ? { name: p.name } : {}); draw(); refreshSide(); },
        }, 'They match: mark verified')));
  };
  draw().catch(() => d.close(''));
  await openDialog(d);
}

// ---- profile ------------------------------------------------------------------------

/** Shrinks a picture to fit the 16 KiB avatar limit; resolves to base64 (no data: prefix). */
async function avatarBase64(file) {
  const bmp = await createImageBitmap(file);
  for (const size of [128, 96, 64, 48]) {
    const c = h('canvas', { width: String(size), height: String(size) });
    const ctx = c.getContext('2d');
    const s = Math.min(bmp.width, bmp.height);
    ctx.drawImage(bmp, (bmp.width - s) / 2, (bmp.height - s) / 2, s, s, 0, 0, size, size);
    const blob = await new Promise((r) => c.toBlob(r, 'image/jpeg', 0.8));
    if (blob && blob.size <= 16 * 1024) {
      const buf = new Uint8Array(await blob.arrayBuffer());
      let bin = '';
      for (const b of buf) bin += String.fromCharCode(b);
      return btoa(bin);
    }
  }
  throw new Error('the picture is too large even when shrunk');
}

/** The avatar this node has now, as base64, so a new name does not drop it. */
async function keepAvatar() {
  const blob = await api.call('GET', '/v1/profiles/' + encodeURIComponent(app.me.peer_id) + '/avatar', undefined, { as: 'blob' });
  const buf = new Uint8Array(await blob.arrayBuffer());
  let bin = '';
  for (const b of buf) bin += String.fromCharCode(b);
  return btoa(bin);
}

export async function profileDialog() {
  const name = h('input', { name: 'name', required: true, maxlength: '64', autofocus: true, value: app.me.name || '' });
  const pic = h('input', { name: 'avatar', type: 'file', accept: 'image/png,image/jpeg,image/webp' });
  const form = h('form', { class: 'stack' },
    h('p', { class: 'muted' }, 'Your PeerId: ', h('code', { class: 'peer' }, app.me.peer_id)),
    field('Your name', name, 'Members see it next to your messages.'),
    field('Picture (optional)', pic),
    h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'primary' }, 'Save')));
  const d = dialogShell('Your profile', form);
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const body = { name: name.value.trim() };
    try {
      if (pic.files[0]) body.avatar = await avatarBase64(pic.files[0]);
      else if (app.me.avatar) body.avatar = await keepAvatar();
    } catch (err) {
      $('#banner-text').textContent = err.message;
      $('#banner').hidden = false;
      return;
    }
    try {
      const p = await api.put('/v1/profile', body);
      app.me = { ...app.me, ...p };
      app.profiles.set(p.peer_id, p);
      drawMe();
      d.close('ok');
    } catch {
      // Banner.
    }
  });
  await openDialog(d);
}

// ---- node status --------------------------------------------------------------------

const REACH = {
  unknown: 'Not tested yet (the first seconds after start)',
  direct: 'Reachable directly',
  relayed: 'Reachable through a relay',
  behind_nat: 'Behind a router: others cannot dial this node, it dials them',
};

export async function statusDialog() {
  const body = h('div', { class: 'stack status-body' });
  const d = dialogShell('Node status', body);
  d.classList.add('status');
  const draw = async () => {
    const [s, peers, files] = await Promise.all([api.get('/v1/status'), api.get('/v1/net/peers'), api.get('/v1/files')]);
    const reach = s.reach || { state: 'unknown' };
    const storage = s.storage || { state: 'ok' };
    const dl = (rows) => h('dl', null, rows.flatMap(([k, v]) => [h('dt', null, k), h('dd', null, v)]));
    const pct = files.quota_bytes ? Math.round((files.used_bytes / files.quota_bytes) * 100) : 0;
    fill(body,
      dl([
        ['PeerId', h('code', { class: 'peer' }, s.peer_id)],
        ['Version', `${s.version} (network ${s.network})`],
        ['Peers', `${s.connected_peers} connected${s.relayed_peers ? `, ${s.relayed_peers} through a relay` : ''}`],
        ['Reachability', h('span', { class: 'reach ' + reach.state }, REACH[reach.state] || reach.state)],
        ['Storage', storage.state === 'ok' ? h('span', { class: 'ok' }, 'Disk OK') : h('span', { class: 'warn' }, storage.message)],
        ['File store', h('span', null, `${bytes(files.used_bytes)} of ${bytes(files.quota_bytes)} (${pct}%)`, h('progress', { max: '100', value: String(pct), 'aria-label': 'File store use' }))],
        ['Groups', String(s.groups.length)],
      ]),
      reach.addrs ? h('details', null, h('summary', null, 'Addresses others reached'), h('ul', null, reach.addrs.map((a) => h('li', null, h('code', null, a.addr), ` (${a.scope})`)))) : null,
      reach.relays ? h('details', null, h('summary', null, 'Relays'), h('ul', null, reach.relays.map((r) => h('li', null, h('code', null, r.addr))))) : null,
      h('details', null, h('summary', null, `Connected peers (${peers.peers.length})`), h('ul', { class: 'peers' }, peers.peers.map((p) => h('li', null, h('code', null, p))))),
      h('details', null, h('summary', null, 'Listening on'), h('ul', null, s.listen_addrs.map((a) => h('li', null, h('code', null, a))))),
      h('div', { class: 'actions' }, h('button', { type: 'button', onclick: logout }, 'Log out of this browser')));
  };
  await draw().catch(() => {});
  const timer = setInterval(() => { if (d.open) draw().catch(() => {}); }, 5000);
  await openDialog(d);
  clearInterval(timer);
}

async function logout() {
  await api.post('/v1/web/logout', {});
  location.replace(location.pathname);
}

export { closeChat };
