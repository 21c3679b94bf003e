// The leasehold console. No dependencies, no build step. Lock names and labels are user
// data: they are only ever written with textContent, never parsed as HTML.
'use strict';

(() => {
  const KEY = 'leasehold.key';
  const REFRESH_MS = 2000;
  const TICK_MS = 200;
  const MAX_EVENTS = 200;

  const $ = (id) => document.getElementById(id);
  const state = {
    key: null,
    // Bumped whenever the key changes or is refused: loops of an older key stop.
    generation: 0,
    abort: null,
    prefix: '',
    limit: 100,
    // Cursors of the pages shown so far (null: the first page).
    after: null,
    pageIndex: 0,
    next: null,
    rows: [],
    fetchedAt: 0,
    refreshTimer: null,
  };

  class Refused extends Error {}

  // `/ui#key=...`: read once, then removed from the address bar and from history.
  function takeKeyFromFragment() {
    if (!location.hash) return;
    let key = null;
    for (const part of location.hash.slice(1).split('&')) {
      if (part.startsWith('key=')) {
        try { key = decodeURIComponent(part.slice(4)); } catch (_) { key = null; }
      }
    }
    history.replaceState(null, '', location.pathname + location.search);
    if (key) sessionStorage.setItem(KEY, key);
  }

  async function api(path, signal) {
    const response = await fetch(path, {
      headers: { Authorization: 'Bearer ' + state.key },
      cache: 'no-store',
      credentials: 'omit',
      referrerPolicy: 'no-referrer',
      signal,
    });
    let body = null;
    try { body = await response.json(); } catch (_) { body = null; }
    const message = body && typeof body.message === 'string' ? body.message : response.statusText;
    if (response.status === 401) throw new Refused(message);
    if (!response.ok) throw new Error(response.status + ': ' + message);
    return body;
  }

  function setStatus(text) { $('status').textContent = text; }

  function showLogin(error) {
    $('console').hidden = true;
    $('forget').hidden = true;
    $('login').hidden = false;
    $('login-error').textContent = error || '';
    setStatus(error ? 'Key refused' : 'No key');
    $('key').focus();
  }

  function stop() {
    state.generation += 1;
    if (state.abort) state.abort.abort();
    state.abort = new AbortController();
    clearTimeout(state.refreshTimer);
  }

  function refused(error) {
    stop();
    state.key = null;
    sessionStorage.removeItem(KEY);
    showLogin('The server refused this key: ' + error.message);
  }

  function start(key) {
    stop();
    state.key = key;
    $('login').hidden = true;
    $('console').hidden = false;
    $('forget').hidden = false;
    setStatus('Loading…');
    firstPage();
    followEvents(state.generation, state.abort.signal);
  }

  // ---- formatting ----------------------------------------------------------------------

  function duration(ms) {
    if (ms < 0) ms = 0;
    if (ms < 60000) return (ms / 1000).toFixed(1) + ' s';
    const s = Math.floor(ms / 1000);
    if (s < 3600) return Math.floor(s / 60) + ' min ' + String(s % 60).padStart(2, '0') + ' s';
    if (s < 86400) return Math.floor(s / 3600) + ' h ' + String(Math.floor(s / 60) % 60).padStart(2, '0') + ' min';
    return Math.floor(s / 86400) + ' d ' + (Math.floor(s / 3600) % 24) + ' h';
  }

  function cell(row, className, text) {
    const td = document.createElement('td');
    td.className = className;
    td.textContent = text;
    row.appendChild(td);
    return td;
  }

  // ---- the listing -----------------------------------------------------------------------

  function kindOf(lock) {
    const holders = (lock.holders || []).length;
    if (lock.holder && lock.mode === 'shared') return 'read by ' + holders;
    if (lock.holder && lock.mode === 'semaphore') return holders + ' of ' + lock.permits + ' permits';
    if (lock.holder) return 'held';
    if (lock.held_back_until_ms) return 'held back';
    return 'waiting';
  }

  function buildRow(lock) {
    const tr = document.createElement('tr');
    const kind = kindOf(lock);
    tr.className = lock.holder ? 'held' : kind.replace(' ', '-');
    tr.dataset.name = lock.name;
    const h = lock.holder;
    cell(tr, 'name', lock.name);
    cell(tr, 'kind', kind);
    let label = h ? (h.metadata == null ? '(no label)' : h.metadata) : '';
    if (h && h.value != null) label += ' (' + h.value + ')';
    const more = (lock.holders || []).length - 1;
    if (more > 0) label += ' +' + more;
    cell(tr, 'label', label);
    cell(tr, 'token num', h ? String(h.fencing_token) : '');
    const entry = {
      lock,
      held: cell(tr, 'held num', ''),
      left: cell(tr, 'left num', ''),
      waiters: cell(tr, 'waiters num', String(lock.waiters)),
      wait: cell(tr, 'wait num', ''),
      tr,
    };
    // The server's clock when it answered: acquired_at_ms is on it.
    entry.serverNow = h ? h.expires_at_ms - h.expires_in_ms : 0;
    return entry;
  }

  // Moves the clocks of the rows shown (a page at most: no work per lock of the project).
  function tick() {
    const elapsed = performance.now() - state.fetchedAt;
    let expired = false;
    for (const row of state.rows) {
      const { lock } = row;
      if (lock.holder) {
        row.held.textContent = duration(row.serverNow - lock.holder.acquired_at_ms + elapsed);
        const left = lock.holder.expires_in_ms - elapsed;
        row.left.textContent = left > 0 ? duration(left) : 'expired';
        row.left.classList.toggle('low', left < 5000);
        if (left <= 0) expired = true;
      } else if (lock.held_back_until_ms) {
        row.left.textContent = 'held back';
      }
      row.wait.textContent = lock.oldest_wait_ms == null ? '' : duration(lock.oldest_wait_ms + elapsed);
    }
    if (expired) scheduleRefresh(300);
  }

  function render(list) {
    state.rows = list.locks.map(buildRow);
    state.fetchedAt = performance.now();
    state.next = list.next || null;
    $('locks').tBodies[0].replaceChildren(...state.rows.map((r) => r.tr));
    $('empty').hidden = state.rows.length > 0;
    $('next').disabled = !state.next;
    const first = state.pageIndex * state.limit + 1;
    $('page-info').textContent = state.rows.length
      ? 'Page ' + (state.pageIndex + 1) + ': locks ' + first + '–' + (first + state.rows.length - 1) + (state.next ? ', more follow' : '')
      : '';
    tick();
    setStatus(list.locks.length + ' lock' + (list.locks.length === 1 ? '' : 's') + ' shown · updated ' + new Date().toLocaleTimeString());
  }

  async function load() {
    const generation = state.generation;
    clearTimeout(state.refreshTimer);
    const query = new URLSearchParams();
    if (state.prefix) query.set('prefix', state.prefix);
    if (state.after) query.set('after', state.after);
    query.set('limit', String(state.limit));
    try {
      const list = await api('/v1/locks?' + query.toString(), state.abort.signal);
      if (generation !== state.generation) return;
      render(list);
    } catch (error) {
      if (generation !== state.generation) return;
      if (error instanceof Refused) return refused(error);
      setStatus('Could not list locks: ' + error.message);
    }
    if (generation === state.generation) scheduleRefresh(REFRESH_MS);
  }

  function scheduleRefresh(ms) {
    clearTimeout(state.refreshTimer);
    state.refreshTimer = setTimeout(load, ms);
  }

  function firstPage() {
    state.after = null;
    state.pageIndex = 0;
    load();
  }

  // ---- live events -----------------------------------------------------------------------

  function describe(e) {
    switch (e.event) {
      case 'granted': return 'granted, token ' + e.token;
      case 'released': return 'released, token ' + e.token;
      case 'expired': return 'lease expired, token ' + e.token;
      case 'cancelled': return e.token == null ? 'a waiter withdrew' : 'grant undone by cancel, token ' + e.token;
      case 'waiter_left': return e.reason === 'timeout' ? 'a waiter timed out' : 'a waiter went away (' + e.reason + ')';
      case 'revoked': return 'revoked' + (e.token == null ? '' : ', token ' + e.token);
      default: return String(e.event);
    }
  }

  function addEvent(text, className) {
    const list = $('events');
    const li = document.createElement('li');
    if (className) li.className = className;
    li.textContent = text;
    list.insertBefore(li, list.firstChild);
    while (list.childElementCount > MAX_EVENTS) list.lastElementChild.remove();
  }

  async function followEvents(generation, signal) {
    let after = null;
    while (generation === state.generation) {
      try {
        const batch = await api('/v1/events' + (after === null ? '' : '?after=' + after), signal);
        if (generation !== state.generation) return;
        if (batch.missed) addEvent('(some events were missed)', 'missed');
        for (const e of batch.events) {
          const at = new Date(Math.floor(e.at_us / 1000)).toLocaleTimeString();
          addEvent(at + '  ' + e.lock + '  ' + describe(e), e.event);
        }
        // Something changed: show it now rather than at the next refresh.
        if (after !== null && batch.events.length) scheduleRefresh(100);
        after = batch.next;
      } catch (error) {
        if (generation !== state.generation) return;
        if (error instanceof Refused) return refused(error);
        await new Promise((resolve) => setTimeout(resolve, 2000));
      }
    }
  }

  // ---- wiring ------------------------------------------------------------------------------

  function useTypedKey() {
    const key = $('key').value.trim();
    if (!key) return;
    $('key').value = '';
    sessionStorage.setItem(KEY, key);
    start(key);
  }

  document.addEventListener('DOMContentLoaded', () => {
    state.abort = new AbortController();
    $('use-key').addEventListener('click', useTypedKey);
    $('key').addEventListener('keydown', (e) => { if (e.key === 'Enter') useTypedKey(); });
    $('forget').addEventListener('click', () => {
      stop();
      state.key = null;
      sessionStorage.removeItem(KEY);
      showLogin('');
    });
    let typing = null;
    const filter = () => {
      clearTimeout(typing);
      typing = setTimeout(() => {
        if ($('prefix').value === state.prefix) return;
        state.prefix = $('prefix').value;
        firstPage();
      }, 250);
    };
    $('prefix').addEventListener('input', filter);
    $('prefix').addEventListener('change', filter);
    $('page-size').addEventListener('change', () => { state.limit = Number($('page-size').value); firstPage(); });
    $('first').addEventListener('click', firstPage);
    $('next').addEventListener('click', () => {
      if (!state.next) return;
      state.after = state.next;
      state.pageIndex += 1;
      load();
    });
    setInterval(tick, TICK_MS);

    takeKeyFromFragment();
    const key = sessionStorage.getItem(KEY);
    if (key) start(key); else showLogin('');
  });
})();
