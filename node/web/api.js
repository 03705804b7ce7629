// The node's local API (docs/API.md), same origin: the session cookie rides along.
// Every failure becomes an ApiError carrying the node's one-line `error` text.

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

const listeners = { error: [], unauthorized: [] };

/** Registers a handler for failed requests ('error') or a lost session ('unauthorized'). */
export function on(kind, f) {
  listeners[kind].push(f);
}

async function failure(res) {
  let code = 'http_' + res.status;
  let message = `the node answered ${res.status} ${res.statusText}`.trim();
  try {
    const body = await res.json();
    if (body && typeof body.error === 'string') {
      message = body.error;
      code = body.code || code;
    }
  } catch {
    // Not our JSON error body: keep the status line.
  }
  return new ApiError(res.status, code, message);
}

/**
 * One request. `body` is sent as JSON unless it is a Blob. Resolves to the parsed JSON
 * (or null for 204, or the Blob for `as: 'blob'`). Errors are reported to the 'error'
 * listeners unless `quiet`, and thrown.
 */
export async function call(method, path, body, opts = {}) {
  const init = { method, headers: {}, credentials: 'same-origin' };
  if (body instanceof Blob) {
    init.body = body;
  } else if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    const err = new ApiError(0, 'network', 'cannot reach the node: is `kith run` still running?');
    if (!opts.quiet) listeners.error.forEach((f) => f(err));
    throw err;
  }
  if (!res.ok) {
    const err = await failure(res);
    if (res.status === 401) listeners.unauthorized.forEach((f) => f(err));
    else if (!opts.quiet) listeners.error.forEach((f) => f(err));
    throw err;
  }
  if (opts.as === 'blob') return res.blob();
  if (res.status === 204) return null;
  const text = await res.text();
  return text ? JSON.parse(text) : null;
}

export const get = (path, opts) => call('GET', path, undefined, opts);
export const post = (path, body = {}, opts) => call('POST', path, body, opts);
export const put = (path, body = {}, opts) => call('PUT', path, body, opts);
export const patch = (path, body = {}, opts) => call('PATCH', path, body, opts);
export const del = (path, opts) => call('DELETE', path, undefined, opts);

/** `/v1/groups/<id>` plus the rest, each part percent-encoded. */
export function g(group, ...rest) {
  return ['/v1/groups', group, ...rest].map((p, i) => (i === 0 ? p : encodeURIComponent(p))).join('/');
}

/**
 * Uploads a file to a group with progress (fetch has no upload progress, XHR does).
 * Resolves to the file Message.
 */
export function upload(group, file, caption, onProgress) {
  return new Promise((resolve, reject) => {
    const q = new URLSearchParams({ name: file.name || 'file' });
    if (caption) q.set('caption', caption);
    const xhr = new XMLHttpRequest();
    xhr.open('POST', g(group, 'files') + '?' + q);
    xhr.setRequestHeader('Content-Type', file.type || 'application/octet-stream');
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded, e.total);
    xhr.onerror = () => {
      const err = new ApiError(0, 'network', 'the upload was cut off: is the node still running?');
      listeners.error.forEach((f) => f(err));
      reject(err);
    };
    xhr.onload = () => {
      if (xhr.status >= 200 && xhr.status < 300) {
        resolve(JSON.parse(xhr.responseText));
        return;
      }
      let err;
      try {
        const b = JSON.parse(xhr.responseText);
        err = new ApiError(xhr.status, b.code, b.error);
      } catch {
        err = new ApiError(xhr.status, 'http_' + xhr.status, `the upload failed (${xhr.status})`);
      }
      if (xhr.status === 401) listeners.unauthorized.forEach((f) => f(err));
      else listeners.error.forEach((f) => f(err));
      reject(err);
    };
    xhr.send(file);
  });
}

/** Every event type the node sends on /v1/events. */
const EVENT_TYPES = [
  'message', 'group_joined', 'epoch_changed', 'history_synced', 'join_progress',
  'join_request_held', 'verification_lost', 'message_changed', 'profile_updated', 'read',
  'typing', 'file_progress', 'lagged',
];

/**
 * Opens the event stream of every group. `handler(type, data)` gets each event;
 * `onState(open)` is told when the stream drops or comes back (EventSource reconnects by
 * itself; a reconnect may have missed events, so it is reported like `lagged`).
 */
export function events(handler, onState) {
  const es = new EventSource('/v1/events');
  let wasOpen = false;
  for (const t of EVENT_TYPES) {
    es.addEventListener(t, (e) => {
      let data;
      try {
        data = JSON.parse(e.data);
      } catch {
        return;
      }
      handler(t, data);
    });
  }
  es.onopen = () => {
    if (wasOpen) handler('lagged', { missed: 0, reconnected: true });
    wasOpen = true;
    onState(true);
  };
  es.onerror = () => onState(false);
  return es;
}
