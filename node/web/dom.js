// Small DOM helpers. Every piece of text from the node (messages, names, file names) is
// hostile input: it only ever goes into the page through textContent or attributes set
// one by one, never through innerHTML.

/** Builds an element: h('button', {class: 'x', onclick: f, 'aria-label': 'Send'}, 'text', child). */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  if (attrs) {
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
      else if (k === 'class') el.className = v;
      else if (k === 'dataset') Object.assign(el.dataset, v);
      else if (k === 'value') el.value = v;
      else if (v === true) el.setAttribute(k, '');
      else el.setAttribute(k, String(v));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === undefined || c === null || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else if (c instanceof Node) el.appendChild(c);
    else el.appendChild(document.createTextNode(String(c)));
  }
}

/** Replaces the children of `el`. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export const $ = (sel, root = document) => root.querySelector(sel);

/** "3.2 MB" for a byte count. */
export function bytes(n) {
  if (n == null) return '';
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let i = 0;
  let v = n;
  while (v >= 1000 && i < units.length - 1) {
    v /= 1000;
    i++;
  }
  return (i === 0 ? String(v) : v.toFixed(v < 10 ? 1 : 0)) + ' ' + units[i];
}

/** A time of day for today, else a short date. */
export function when(ms) {
  if (!ms) return '';
  const d = new Date(ms);
  const now = new Date();
  if (d.toDateString() === now.toDateString()) {
    return d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  }
  return d.toLocaleDateString([], { month: 'short', day: 'numeric' });
}

/** The last 8 characters of a PeerId, as the node's labels show them. */
export const short = (peer) => (peer ? peer.slice(-8) : '');

/** Opens a modal <dialog>, focusing its first field; resolves when it closes. */
export function openDialog(dialog) {
  if (!dialog.isConnected) document.body.appendChild(dialog);
  dialog.showModal();
  const first = dialog.querySelector('[autofocus], input, textarea, select, button:not(.close)');
  if (first) first.focus();
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => {
      resolve(dialog.returnValue);
      dialog.remove();
    }, { once: true });
  });
}

/** A dialog shell with a title and a close button. */
export function dialogShell(title, ...body) {
  const d = h('dialog', { class: 'panel', 'aria-label': title });
  const close = h('button', { class: 'close icon', type: 'button', 'aria-label': 'Close', onclick: () => d.close('') }, '×');
  d.append(h('header', null, h('h2', null, title), close), ...body.flat());
  return d;
}

/** Asks a yes/no question in a dialog; resolves true on yes. */
export async function confirmDialog(question, yes = 'OK') {
  const d = dialogShell('Please confirm',
    h('p', null, question),
    h('form', { method: 'dialog', class: 'actions' },
      h('button', { value: 'no', type: 'submit' }, 'Cancel'),
      h('button', { value: 'yes', type: 'submit', class: 'danger', autofocus: true }, yes)));
  return (await openDialog(d)) === 'yes';
}
