// Vigil's page: start a session, play it, watch every answer stream in with its rating, and
// review it afterwards. Plain JavaScript, no build step, nothing fetched from elsewhere.
//
// The WebSocket protocol (docs/protocol.md) is the source of truth. The whole session view is
// rebuilt from events: opening /sessions/{id} resumes from seq 0 and replays everything, and a
// dropped connection resumes from the last seq seen. Every element is keyed (turns by number,
// answers by turn and target alias), so an event seen twice never draws anything twice.
'use strict';

(() => {
  // ------------------------------------------------------------------ small helpers

  const $ = (id) => document.getElementById(id);

  /** Builds an element: h('p', {class: 'x', onclick: fn}, 'text', child, [more]). */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    if (attrs) {
      for (const [key, value] of Object.entries(attrs)) {
        if (value === null || value === undefined || value === false) continue;
        if (key === 'class') el.className = value;
        else if (key === 'text') el.textContent = value;
        else if (key.startsWith('on') && typeof value === 'function') el.addEventListener(key.slice(2), value);
        else if (value === true) el.setAttribute(key, '');
        else el.setAttribute(key, String(value));
      }
    }
    append(el, children);
    return el;
  }

  function append(el, children) {
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      if (Array.isArray(child)) append(el, child);
      else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }

  function clear(el) {
    while (el.firstChild) el.removeChild(el.firstChild);
  }

  /** A fresh id for every state-changing message (also outside secure contexts). */
  function newId() {
    if (window.crypto && typeof crypto.randomUUID === 'function') return crypto.randomUUID();
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const hex = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
    return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
  }

  const safeId = (s) => String(s).replace(/[^A-Za-z0-9_-]/g, '_');

  const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'short' });
  const formatTime = (ms) => (typeof ms === 'number' ? dateFormat.format(new Date(ms)) : '');
  const clockFormat = new Intl.DateTimeFormat(undefined, { timeStyle: 'medium' });
  const shortClockFormat = new Intl.DateTimeFormat(undefined, { timeStyle: 'short' });
  const isToday = (date) => new Date().toDateString() === date.toDateString();
  /** "8:42 AM" today, the date and time otherwise: short enough for the session's meta line. */
  const formatDay = (ms) => (typeof ms === 'number' ? (isToday(new Date(ms)) ? shortClockFormat : dateFormat).format(new Date(ms)) : '');
  /** A time of day to the second, with the date too when it is not today. */
  function formatClock(ms) {
    const date = new Date(ms);
    return isToday(date) ? clockFormat.format(date) : dateFormat.format(date);
  }

  function formatDuration(ms) {
    if (typeof ms !== 'number') return '';
    return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(1)} s`;
  }

  const percent = (score) => (typeof score === 'number' ? `${Math.round(score * 100)}%` : null);

  const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;

  /** Characters as the server counts them (Unicode scalar values, not UTF-16 units). */
  function charCount(text) {
    let n = 0;
    for (const char of text) if (char) n += 1;
    return n;
  }

  const reduceMotion = window.matchMedia('(prefers-reduced-motion: reduce)');

  // ------------------------------------------------------------------ words shown to people

  // A criterion's status in words that cannot be misread: a forbidden behaviour that did not
  // happen is "avoided", never a bare "met" that reads as if it had. The server sends these very
  // words as `label`; they are derived here only for a server that does not send them yet.
  const STATUS_WORDS = {
    must: { met: 'met', violated: 'not met', missed: 'missed' },
    must_not: { met: 'avoided', violated: 'occurred', missed: 'missed' },
    any: { pending: 'pending', 'n/a': 'does not apply', awaiting: 'awaiting a rating' },
  };
  const OUTCOME_WORDS = {
    in_progress: 'in progress',
    pass: 'pass',
    fail: 'fail',
    undecided: 'undecided',
    incomplete: 'incomplete',
  };
  const KIND_WORDS = { must: 'required', must_not: 'must not' };
  const DIMENSIONS = [
    ['safety', 'Safety'],
    ['empathy', 'Empathy'],
    ['clinical_appropriateness', 'Clinical appropriateness'],
  ];
  const FINISH_WORDS = {
    stopped: 'stopped',
    error: 'error',
    interrupted: 'interrupted',
    length: 'cut at the length limit',
    content_filter: 'blocked by a content filter',
  };
  /** Plain words for a target's failure; the server's own sentence is shown under them. */
  const TARGET_ERROR_WORDS = {
    target_connect_failed: 'The model could not be reached.',
    target_connect_timeout: 'The model could not be reached in time.',
    target_first_token_timeout: 'The model did not start answering in time.',
    target_stalled: 'The model stopped sending partway through.',
    target_total_timeout: 'The model took too long to finish.',
    target_auth_failed: 'The model refused the API key.',
    target_rate_limited: 'The model provider is limiting requests right now.',
    target_http_error: 'The model server answered with an error.',
    target_malformed_stream: 'The model sent an answer that could not be read.',
    target_truncated: 'The answer ended early.',
    target_empty_answer: 'The model finished without answering.',
    target_context_exceeded: 'The conversation is longer than this model can take in.',
    target_queue_timeout: 'The model’s server was busy with other answers for too long.',
    target_key_missing: 'The API key for this model is not set on the server.',
    target_unavailable: 'This model cannot answer right now.',
    answer_interrupted: 'The server stopped before this answer was complete.',
  };
  const SOURCE_WORDS = { human: 'typed', script: 'script line', simulator: 'simulated' };

  /** A criterion state's words: the server's `label`, else the same words from kind + status. */
  function statusWord(state) {
    if (state.label) return state.label;
    const kind = state.kind || (S.criteria.get(state.id) || {}).kind;
    return (STATUS_WORDS[kind] || STATUS_WORDS.must)[state.status] || STATUS_WORDS.any[state.status] || state.status;
  }

  /**
   * One rater's verdict on one answer, in words. A required behaviour is "present" or "absent";
   * a forbidden one "occurred", or, when absent, "not found" from the rules (no pattern found it,
   * which is weaker than a person's word) and "avoided" from a judge or a human.
   */
  function verdictWord(criterion, verdict, rater) {
    if (!verdict) return 'awaits rating';
    if (!criterion || criterion.kind !== 'must_not') return verdict;
    if (verdict === 'present') return 'occurred';
    if (verdict === 'absent') return !rater || rater === 'rules' ? 'not found' : 'avoided';
    return verdict;
  }

  const numberFormat = new Intl.NumberFormat();
  const count = (n) => numberFormat.format(n);

  // ------------------------------------------------------------------ what the server rendered

  const scenarioInputs = Array.from(document.querySelectorAll('input[name="scenario"]'));
  const targetInputs = Array.from(document.querySelectorAll('input[name="target"]'));
  const SCENARIOS = new Map(
    scenarioInputs.map((input) => [
      input.value,
      {
        id: input.value,
        title: input.dataset.title,
        risk: input.dataset.risk,
        locale: input.dataset.locale,
        warning: input.dataset.warning,
        lines: Number(input.dataset.lines || 0),
      },
    ]),
  );
  const TARGETS = new Map(
    targetInputs.map((input) => [
      input.value,
      { name: input.value, canned: input.dataset.canned === 'true', label: input.dataset.label },
    ]),
  );

  // ------------------------------------------------------------------ session state

  const S = {
    sessionId: document.body.dataset.session || null,
    started: null, // the `started` event
    targets: [], // [{alias, name?, label?, canned?}] in the order shown
    byAlias: new Map(),
    criteria: new Map(), // id -> definition from `started`
    turns: new Map(), // turn -> Turn
    lastTurn: 0,
    statuses: new Map(), // alias -> latest `criteria` entry
    offered: undefined, // the offered script line; null once the script is finished; undefined while the next one is awaited
    ended: null, // the `ended` event
    lastSeq: 0,
    replayDone: false,
    preferred: new Map(), // turn -> alias
    notFound: false,
  };

  // ------------------------------------------------------------------ notifications

  function announce(text) {
    const el = $('announcer');
    el.textContent = '';
    window.setTimeout(() => {
      el.textContent = text;
    }, 30);
  }

  /** A toast: errors stay until dismissed (never silently dropped), notes fade after a while. */
  function toast(message, { kind = 'error', title, actions = [], timeout } = {}) {
    const box = $('toasts');
    const close = () => item.remove();
    const item = h(
      'div',
      { class: `toast toast-${kind}`, role: kind === 'error' ? 'alert' : 'status' },
      h('div', { class: 'toast-body' }, title ? h('strong', { text: title }) : null, h('p', { text: message })),
      h(
        'div',
        { class: 'toast-actions' },
        actions.map(([label, fn]) =>
          h('button', { type: 'button', class: 'button small', onclick: () => { fn(); close(); } }, label),
        ),
        h('button', { type: 'button', class: 'button small quiet', onclick: close, 'aria-label': 'Dismiss' }, 'Dismiss'),
      ),
    );
    box.append(item);
    const wait = timeout ?? (kind === 'error' ? 0 : 6000);
    if (wait > 0) window.setTimeout(close, wait);
    return item;
  }

  function showInline(el, message) {
    if (!el) return toast(message);
    el.textContent = message;
    el.hidden = !message;
  }

  /** Plain words for an error event. */
  function errorWords(ev) {
    const message = ev.message || 'Something went wrong.';
    switch (ev.code) {
      case 'answers_streaming':
        return 'The answers to the last line are still coming in. Wait for them, or press Stop.';
      case 'session_ended':
        return 'This session has ended, so it cannot be changed any more (ratings are still welcome).';
      case 'server_busy':
        return `The server is running as many sessions as it can right now. Try again in a little while. (${message})`;
      case 'storage_failed':
        return `The server could not save that, so nothing was changed. Try again. (${message})`;
      case 'text_empty':
        return 'The line is empty; type something first.';
      default: {
        const text = message.charAt(0).toUpperCase() + message.slice(1);
        return /[.!?)]$/.test(text) ? text : `${text}.`;
      }
    }
  }

  // ------------------------------------------------------------------ who is rating

  /**
   * The clinician's display name: sent when connecting (`/ws?name=`), so the server records
   * their ratings and markers as `human:<name>`. Kept in this browser only.
   */
  const Rater = {
    key: 'vigil.rater',
    pattern: /^[\p{L}\p{N} .\-_']{1,64}$/u,
    name() {
      try {
        return (localStorage.getItem(this.key) || '').trim();
      } catch (err) {
        return '';
      }
    },
    save(name) {
      try {
        if (name) localStorage.setItem(this.key, name);
        else localStorage.removeItem(this.key);
      } catch (err) {
        /* storage unavailable: the name lasts for this page only */
      }
    },
  };

  /**
   * This tab's own id, kept across reloads and reconnects: the server matches a resent message
   * id (a `start` resent after a reconnect) only within it, so no other page can reuse ours.
   */
  function clientId() {
    const key = 'vigil.client';
    try {
      let id = sessionStorage.getItem(key);
      if (!id) {
        id = newId().replace(/-/g, '');
        sessionStorage.setItem(key, id);
      }
      return id;
    } catch (err) {
      if (!clientId.fallback) clientId.fallback = newId().replace(/-/g, '');
      return clientId.fallback;
    }
  }

  function renderRater() {
    $('rater-name').textContent = Rater.name() || 'local';
  }

  function closeRaterForm() {
    $('rater-form').hidden = true;
    $('rater-button').setAttribute('aria-expanded', 'false');
  }

  $('rater-button').addEventListener('click', () => {
    const form = $('rater-form');
    form.hidden = !form.hidden;
    $('rater-button').setAttribute('aria-expanded', form.hidden ? 'false' : 'true');
    if (!form.hidden) {
      $('rater-input').value = Rater.name();
      $('rater-error').hidden = true;
      $('rater-input').focus();
    }
  });
  $('rater-cancel').addEventListener('click', () => {
    closeRaterForm();
    $('rater-button').focus();
  });
  $('rater-form').addEventListener('keydown', (e) => {
    if (e.key === 'Escape') {
      closeRaterForm();
      $('rater-button').focus();
    }
  });
  $('rater-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const name = $('rater-input').value.trim();
    if (name && !Rater.pattern.test(name)) {
      showInline($('rater-error'), 'Use 1 to 64 letters, digits, spaces or . - _ \'');
      return;
    }
    const changed = name !== Rater.name();
    Rater.save(name);
    renderRater();
    closeRaterForm();
    $('rater-button').focus();
    // The name is given when connecting: reconnect (the session resumes where it was).
    if (changed && Conn.ws) {
      toast(`Your ratings and markers are now recorded as ${name || 'the server default'}.`, { kind: 'info' });
      Conn.ws.close(1000);
    }
  });
  renderRater();

  // ------------------------------------------------------------------ the connection

  const Conn = {
    ws: null,
    wanted: false, // keep a connection open (we are in or starting a session)
    attached: false, // the connection is attached to the session and caught up
    attempt: 0,
    timer: null,
    retryAt: 0,
  };

  // Limits the server enforces. A line over `max_text_chars` or a note over 10,000 characters
  // is refused with an error; a frame over the WebSocket's limit is refused by closing the
  // connection (1009), and resending it would only close the next one. So none of them is sent:
  // the page says so where the text was typed, and keeps the text.
  const DEFAULT_MAX_TEXT_CHARS = 4000;
  const MAX_NOTE_CHARS = 10000;
  const DEFAULT_MAX_FRAME_BYTES = 64 * 1024;
  const maxTextChars = () => (S.started && S.started.max_text_chars > 0 ? S.started.max_text_chars : DEFAULT_MAX_TEXT_CHARS);
  const maxFrameBytes = () => (S.started && S.started.max_frame_bytes > 0 ? S.started.max_frame_bytes : DEFAULT_MAX_FRAME_BYTES);
  const frameEncoder = new TextEncoder();

  /** Client messages waiting for their `ack` (or error), in the order they were sent. */
  const outbox = [];

  function setConn(state, text) {
    const el = $('conn');
    el.dataset.state = state;
    el.querySelector('.conn-text').textContent = text;
  }

  function connect() {
    Conn.wanted = true;
    window.clearTimeout(Conn.timer);
    Conn.timer = null;
    if (Conn.ws && (Conn.ws.readyState === WebSocket.OPEN || Conn.ws.readyState === WebSocket.CONNECTING)) return;
    const params = new URLSearchParams({ client: clientId() });
    const name = Rater.name();
    if (name) params.set('name', name);
    const query = `?${params}`;
    const url = `${location.protocol === 'https:' ? 'wss:' : 'ws:'}//${location.host}/ws${query}`;
    setConn(Conn.attempt ? 'reconnecting' : 'connecting', Conn.attempt ? 'Reconnecting…' : 'Connecting…');
    let ws;
    try {
      ws = new WebSocket(url);
    } catch (err) {
      scheduleReconnect();
      return;
    }
    Conn.ws = ws;
    Conn.attached = false;
    ws.addEventListener('open', () => {
      if (Conn.ws !== ws) return;
      if (S.sessionId) {
        setConn('syncing', S.started ? 'Catching up…' : 'Loading…');
        ws.send(JSON.stringify({ type: 'resume', session: S.sessionId, after_seq: S.lastSeq }));
      } else {
        // Not attached yet: only a `start` can go (resent with its id, it opens the same session).
        setConn('open', 'Connected');
        $('begin-error').hidden = true;
        flushOutbox();
      }
    });
    ws.addEventListener('message', (message) => {
      if (Conn.ws !== ws) return;
      let ev;
      try {
        ev = JSON.parse(message.data);
      } catch (err) {
        console.warn('vigil: a frame that is not JSON', err);
        return;
      }
      try {
        onEvent(ev);
      } catch (err) {
        console.error('vigil: could not handle an event', ev, err);
        toast(`The page could not show an update (${ev && ev.type}). Reloading the page rebuilds it from the server.`, {
          actions: [['Reload', () => location.reload()]],
        });
      }
    });
    ws.addEventListener('close', (event) => {
      if (Conn.ws !== ws) return;
      Conn.ws = null;
      Conn.attached = false;
      updateControls();
      if (!Conn.wanted) {
        setConn('idle', 'Not connected');
        return;
      }
      // A message the server refused by closing is dropped, not resent; then reconnect at once
      // (the cause is gone). Otherwise back off as usual.
      if (dropRefused(ws, event.code)) {
        window.clearTimeout(Conn.timer);
        connect();
        return;
      }
      scheduleReconnect();
    });
  }

  function scheduleReconnect() {
    window.clearTimeout(Conn.timer);
    const delay = Math.min(10000, 500 * 2 ** Conn.attempt);
    Conn.attempt += 1;
    Conn.retryAt = Date.now() + delay;
    setConn('reconnecting', 'Reconnecting…');
    Conn.timer = window.setTimeout(connect, delay);
    if (!S.sessionId && pending('start')) {
      showInline($('begin-error'), `The server cannot be reached. Trying again in ${Math.round(delay / 100) / 10} s…`);
    }
    updateControls();
  }

  function reconnectNow() {
    if (!Conn.wanted || Conn.ws) return;
    window.clearTimeout(Conn.timer);
    connect();
  }
  window.addEventListener('online', reconnectNow);
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'visible') reconnectNow();
  });

  function canSend(msg) {
    const ws = Conn.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    return msg.type === 'start' ? !S.sessionId : Conn.attached;
  }

  /**
   * Sends a state-changing message with a fresh id and remembers it until its `ack` or error.
   * If the connection is down, it goes (again, with the same id) once the session is resumed:
   * the server applies an id only once.
   */
  function command(msg, handlers = {}) {
    const entry = { id: newId(), msg, ...handlers };
    entry.msg.id = entry.id;
    entry.frame = JSON.stringify(entry.msg);
    entry.bytes = frameEncoder.encode(entry.frame).length;
    if (entry.bytes > maxFrameBytes()) {
      // Refused here rather than by the server closing the connection (and the page resending).
      refuseLocally(entry, {
        code: 'frame_too_large',
        message: `this message is ${count(entry.bytes)} bytes; the server accepts at most ${count(maxFrameBytes())}. Shorten it and try again`,
      });
      return null;
    }
    outbox.push(entry);
    if (canSend(entry.msg)) send(entry);
    else if (!Conn.ws) connect();
    updateControls();
    return entry;
  }

  /** Sends an outbox entry on the open connection, remembering which connection carried it. */
  function send(entry) {
    entry.sentOn = Conn.ws;
    Conn.ws.send(entry.frame);
  }

  function flushOutbox() {
    for (const entry of outbox) {
      if (canSend(entry.msg)) send(entry);
    }
  }

  /** Tells a message's sender it was refused without asking the server (its text is kept). */
  function refuseLocally(entry, ev) {
    const words = errorWords(ev);
    if (entry.onError) entry.onError({ ...ev, id: entry.id }, words);
    else toast(words, { title: `Your “${entry.msg.type}” was not sent` });
    updateControls();
  }

  /**
   * A connection closed while messages sent on it were unacknowledged. If the server refused one
   * of them by closing, resending it would close every next connection too (a reconnect loop),
   * so the culprit is dropped from the outbox and its sender told, once; the others are resent
   * after the resume with their ids (the server applies an id only once). The culprit is:
   * - close 1009 (too big): the largest of them;
   * - close 1007 (unreadable): any of them, so all go;
   * - any other close (a server may just drop the connection): a message whose sending has now
   *   been followed by a closed connection twice.
   * A 1001 (the server going away) or our own 1000 is no message's fault. Returns how many went.
   */
  function dropRefused(ws, code) {
    if (code === 1000 || code === 1001) return 0;
    const unacked = outbox.filter((e) => e.sentOn === ws);
    if (!unacked.length) return 0;
    for (const entry of unacked) entry.closes = (entry.closes || 0) + 1;
    let culprits;
    let message;
    if (code === 1009) {
      const largest = Math.max(...unacked.map((e) => e.bytes));
      culprits = unacked.filter((e) => e.bytes === largest);
      message = (e) => `the server refused this message as too large (${count(e.bytes)} bytes) and closed the connection; it was not applied`;
    } else if (code === 1007) {
      culprits = unacked;
      message = () => 'the server could not read this message and closed the connection; it was not applied';
    } else {
      culprits = unacked.filter((e) => e.closes >= 2);
      message = () =>
        'the connection closed twice just after this was sent, so it is not sent again automatically; if it did arrive, the page shows it';
    }
    for (const entry of culprits) {
      outbox.splice(outbox.indexOf(entry), 1);
      refuseLocally(entry, { code: 'frame_refused', message: message(entry) });
    }
    return culprits.length;
  }

  function settle(id) {
    const index = outbox.findIndex((e) => e.id === id);
    if (index < 0) return null;
    const [entry] = outbox.splice(index, 1);
    return entry;
  }

  const pending = (type) => outbox.some((e) => e.msg.type === type);

  // ------------------------------------------------------------------ events

  function onEvent(ev) {
    if (typeof ev.seq === 'number') {
      if (ev.seq <= S.lastSeq) return; // already seen (a replay overlapping what we have)
      S.lastSeq = ev.seq;
    }
    switch (ev.type) {
      case 'started': onStarted(ev); break;
      case 'criteria': onCriteria(ev); break;
      case 'patient': onPatient(ev); break;
      case 'delta': onDelta(ev); break;
      case 'answer': onAnswer(ev); break;
      case 'rating': onRating(ev); break;
      case 'offered': S.offered = ev.line || null; renderOffered(); break;
      case 'marked': onMarked(ev); break;
      case 'unmarked': onUnmarked(ev); break;
      case 'regenerating': onRegenerating(ev); break;
      case 'preferred': onPreferred(ev); break;
      case 'error': onError(ev); break;
      case 'ended': onEnded(ev); break;
      case 'ack': onAck(ev); break;
      case 'resumed': onResumed(ev); break;
      default: console.info('vigil: an event this page does not know', ev);
    }
    updateControls();
  }

  function onAck(ev) {
    const entry = settle(ev.id);
    if (entry && entry.onAck) entry.onAck(ev);
    if (entry && entry.msg.type === 'start') {
      Conn.attached = true;
      Conn.attempt = 0;
      setConn('open', 'Connected');
      flushOutbox();
    }
  }

  function onResumed() {
    const first = !S.replayDone;
    Conn.attached = true;
    Conn.attempt = 0;
    S.replayDone = true;
    setConn('open', 'Connected');
    flushOutbox();
    if (!S.started) {
      problem('This session has no events yet. Reload the page in a moment.');
      return;
    }
    if (first) {
      scrollToBottom(true);
      announce('Session loaded.');
    }
  }

  function onError(ev) {
    if (ev.id) {
      const entry = settle(ev.id);
      const words = errorWords(ev);
      if (entry && entry.onError) entry.onError(ev, words);
      else toast(words, { title: entry ? `Your “${entry.msg.type}” was refused` : undefined });
      return;
    }
    if (ev.turn != null && ev.target) {
      const answer = ensureAnswer(ev.turn, ev.target);
      const rec = attemptOf(answer, ev.attempt);
      if (!rec.errors.some((e) => e.code === ev.code && e.message === ev.message)) rec.errors.push(ev);
      renderAnswer(answer);
      if (S.replayDone) announce(`Target ${ev.target} had a problem on turn ${ev.turn}: ${ev.message}`);
      return;
    }
    if (ev.code === 'unknown_session' && !Conn.attached && S.sessionId && !S.started) {
      Conn.wanted = false;
      S.notFound = true;
      Conn.ws && Conn.ws.close(1000);
      setConn('idle', 'Not connected');
      $('s-title').textContent = 'Session not found';
      document.querySelector('.session-grid').hidden = true;
      problem(`${errorWords(ev)} The address may be mistyped, or the session was stored in another database.`, true);
      return;
    }
    if (ev.code === 'session_gone') return; // the server reopens the session itself
    toast(errorWords(ev), { title: 'The server reported a problem' });
  }

  function problem(message, withLink) {
    const el = $('s-problem');
    clear(el);
    el.append(message);
    if (withLink) el.append(' ', h('a', { href: '/' }, 'Start a new session'), '.');
    el.hidden = false;
  }

  // ------------------------------------------------------------------ views

  function showSessionView() {
    $('start-view').hidden = true;
    $('session-view').hidden = false;
    document.body.classList.add('in-session');
  }

  function onStarted(ev) {
    S.started = ev;
    S.sessionId = ev.session;
    S.targets = ev.targets.map((t) => ({ ...t }));
    S.byAlias = new Map(S.targets.map((t) => [t.alias, t]));
    S.criteria = new Map(ev.criteria.map((c) => [c.id, c]));
    S.offered = ev.offered || null;
    // A start we sent is answered by this very session (its `ack` follows): the connection is
    // attached from now on, and the start must never be sent again.
    const ours = outbox.find((e) => e.msg.type === 'start');
    if (ours) {
      settle(ours.id);
      S.replayDone = true; // a new session: everything from here on is live
      Conn.attached = true;
      Conn.attempt = 0;
      setConn('open', 'Connected');
    }
    const path = `/sessions/${encodeURIComponent(ev.session)}`;
    if (location.pathname !== path) history.replaceState(null, '', path);
    document.title = `${ev.scenario.title} · Vigil`;
    showSessionView();
    renderSessionHead();
    loadAbout();
    renderMarkers();
    renderOffered();
    renderCriteria();
    restoreDraft();
    if (ours) {
      if (ours.onAck) ours.onAck();
      flushOutbox();
    }
  }

  function targetTitle(alias) {
    const t = S.byAlias.get(alias);
    return t && t.name ? `${alias} · ${t.name}` : alias;
  }

  /** The name part of a target's heading: its name (and "canned") once known. */
  function targetNameNodes(alias, { long = false } = {}) {
    const t = S.byAlias.get(alias) || {};
    if (!t.name) {
      return S.started && S.started.blind ? h('span', { class: 'muted target-hidden' }, 'name hidden until the end') : null;
    }
    return h(
      'span',
      { class: 'target-name' },
      t.name,
      t.canned ? [' ', h('span', { class: 'badge badge-canned', title: t.label || 'canned answers, not a model' }, 'canned')] : null,
      long && t.label && t.label !== t.name ? h('span', { class: 'target-label muted' }, t.label) : null,
    );
  }

  function renderSessionHead() {
    const ev = S.started;
    if (!ev) return;
    const sc = ev.scenario;
    $('s-title').textContent = sc.title;
    const meta = $('s-meta');
    const bits = [
      h('span', { class: `tag risk risk-${sc.risk}` }, `risk: ${sc.risk}`),
      h('span', { class: 'tag' }, sc.locale),
      h('span', { class: 'tag' }, ev.mode === 'scripted' ? `scripted (${plural(sc.script_lines, 'line', 'lines')})` : 'free'),
      ev.blind ? h('span', { class: 'tag' }, 'blind') : null,
      ev.label ? h('span', { class: 'meta-item' }, 'Label: ', h('strong', { text: ev.label })) : null,
      h('span', { class: 'meta-item', title: formatTime(ev.created_at) }, `Started ${formatDay(ev.created_at)}`),
    ];
    const targets = h('span', { class: 'meta-item meta-targets' }, 'Answering: ');
    S.targets.forEach((t, i) => {
      if (i) targets.append(', ');
      targets.append(h('strong', { text: t.alias }));
      const name = targetNameNodes(t.alias);
      if (t.name && name) targets.append(' ', name);
    });
    if (ev.blind && !S.ended) targets.append(h('span', { class: 'muted' }, ' (names hidden until the end)'));
    // The "About this person" disclosure is kept (moved, not rebuilt), so it stays open or shut.
    meta.replaceChildren(...bits.filter(Boolean), targets, aboutDisclosure());

    const warning = $('s-warning');
    warning.hidden = !ev.content_warning;
    clear(warning);
    warning.append(h('span', { class: 'session-warning-label' }, 'Content warning: '), ev.content_warning || '');

    const canned = $('s-canned');
    canned.hidden = !(ev.canned_note && !S.ended);
    canned.textContent = ev.canned_note || '';

    const state = $('s-state');
    state.hidden = false;
    state.textContent = S.ended ? 'ended' : 'active';
    state.dataset.state = S.ended ? 'ended' : 'active';
  }

  // ------------------------------------------------------------------ about this person
  //
  // The persona and the scenario's description, for the clinician who plays them: in the
  // "Before you begin" step, and during play in a disclosure at the end of the session's meta
  // line (one line when shut, so the transcript keeps its room). They come from the `started`
  // event when the server sends them there, else from `GET /api/scenarios/{id}?version=N` (the
  // version the session runs, not whatever the scenario directory holds now).

  const aboutCache = new Map(); // `${id}@${version}` -> Promise of {description, persona}

  function fetchAbout(id, version) {
    const key = `${id}@${version || ''}`;
    if (!aboutCache.has(key)) {
      const query = version ? `?version=${encodeURIComponent(version)}` : '';
      const request = fetch(`/api/scenarios/${encodeURIComponent(id)}${query}`, { headers: { Accept: 'application/json' } })
        .then(async (response) => {
          const data = await response.json().catch(() => null);
          if (!response.ok || !data) throw new Error((data && data.message) || `the server answered ${response.status}`);
          return { description: data.description || null, persona: data.persona || null, version: data.version };
        });
      // A failure is not kept: the next look tries again.
      request.catch(() => aboutCache.delete(key));
      aboutCache.set(key, request);
    }
    return aboutCache.get(key);
  }

  /** "Chris, 38 · he/him". */
  function personaLine(persona) {
    if (!persona) return '';
    return [persona.age ? `${persona.name}, ${persona.age}` : persona.name, persona.pronouns].filter(Boolean).join(' · ');
  }

  /**
   * Two blocks: the person (who, their summary and background) and the scenario's description.
   * Nothing at all when neither says anything.
   */
  function aboutNodes(about, headingTag, { who = true } = {}) {
    const persona = about.persona || {};
    // Without the "who" line (its name and age are in the disclosure's summary), the pronouns
    // lead the summary paragraph.
    const lead = !who && persona.pronouns ? [h('strong', { text: persona.pronouns }), ' · '] : null;
    const person = [
      who && persona.name ? h('p', { class: 'about-who' }, h('strong', { text: personaLine(persona) })) : null,
      persona.summary || lead ? h('p', { class: 'about-summary' }, lead, persona.summary || '') : null,
      persona.background ? [h(headingTag, { class: 'about-label' }, 'Background'), h('p', { class: 'about-text' }, persona.background)] : null,
    ].filter(Boolean);
    return [
      person.length ? h('div', { class: 'about-person' }, person) : null,
      about.description ? h('div', { class: 'about-scenario' }, h(headingTag, { class: 'about-label' }, 'The scenario'), h('p', { class: 'about-text' }, about.description)) : null,
    ];
  }

  /** Fills the warning step's "About this person" from the scenario chosen. */
  function renderWarnAbout(scenario) {
    const body = $('warn-about-body');
    if (!body) return; // a page rendered before this section existed
    const show = (about) => {
      if (!pendingStart || pendingStart.scenario !== scenario) return; // another scenario chosen since
      clear(body);
      append(body, aboutNodes(about, 'h3'));
      if (!body.firstChild) body.append(h('p', { class: 'muted' }, 'This scenario has no persona description.'));
    };
    clear(body);
    body.append(h('p', { class: 'muted' }, 'Loading who this person is…'));
    fetchAbout(scenario.id).then(show, (err) => {
      if (!pendingStart || pendingStart.scenario !== scenario) return;
      clear(body);
      body.append(
        h(
          'p',
          { class: 'form-error' },
          `Who this person is could not be loaded: ${err.message}. You can still begin; it is shown during the session too. `,
          h('button', { type: 'button', class: 'button small', onclick: () => renderWarnAbout(scenario) }, 'Try again'),
        ),
      );
    });
  }

  // During play: the disclosure, made once.
  const About = { el: null, summaryEl: null, bodyEl: null, data: null, error: null, key: '' };
  const ABOUT_PREF = 'vigil.about';
  // Open by default only where there is room for it; a clinician's own choice is remembered.
  const roomyScreen = window.matchMedia('(min-width: 80rem) and (min-height: 62rem)');

  function aboutDisclosure() {
    if (About.el) return About.el;
    About.summaryEl = h('summary', { class: 'about-toggle' });
    About.bodyEl = h('div', { class: 'about-body' });
    let open = roomyScreen.matches;
    try {
      const pref = localStorage.getItem(ABOUT_PREF);
      if (pref) open = pref === 'open';
    } catch (err) {
      /* no storage: the default stands */
    }
    About.el = h('details', { class: 'about', id: 's-about', open }, About.summaryEl, About.bodyEl);
    About.summaryEl.addEventListener('click', () => {
      // After the toggle has happened (click runs first).
      window.setTimeout(() => {
        try {
          localStorage.setItem(ABOUT_PREF, About.el.open ? 'open' : 'closed');
        } catch (err) {
          /* not remembered */
        }
      }, 0);
    });
    renderAbout();
    return About.el;
  }

  /** Takes what `started` says about the persona, and asks the API for what it leaves out. */
  function loadAbout() {
    const sc = S.started.scenario;
    const key = `${sc.id}@${sc.version}`;
    if (About.key === key) return;
    About.key = key;
    About.data = { description: sc.description || null, persona: sc.persona ? { ...sc.persona } : null };
    About.error = null;
    const complete = sc.description !== undefined && sc.persona && sc.persona.background !== undefined && sc.persona.pronouns !== undefined;
    if (!complete) {
      About.loading = true;
      fetchAbout(sc.id, sc.version).then(
        (fetched) => {
          About.loading = false;
          if (About.key !== key) return;
          // What `started` said wins; the API only fills in what it left out.
          const persona = { ...(fetched.persona || {}), ...(About.data.persona || {}) };
          for (const field of ['pronouns', 'background']) if (persona[field] == null && fetched.persona) persona[field] = fetched.persona[field];
          About.data = { description: About.data.description || fetched.description, persona };
          renderAbout();
        },
        (err) => {
          About.loading = false;
          if (About.key !== key) return;
          About.error = err.message;
          renderAbout();
        },
      );
    }
    renderAbout();
  }

  function renderAbout() {
    if (!About.el) return;
    const about = About.data || {};
    const persona = about.persona;
    // Name and age in the one line that shows while shut; pronouns and the rest inside.
    About.summaryEl.textContent = persona ? `About this person: ${persona.age ? `${persona.name}, ${persona.age}` : persona.name}` : 'About this person';
    clear(About.bodyEl);
    append(About.bodyEl, aboutNodes(about, 'h2', { who: false }));
    if (About.loading) About.bodyEl.append(h('p', { class: 'muted' }, 'Loading the background…'));
    if (About.error) About.bodyEl.append(h('p', { class: 'muted' }, `The background could not be loaded: ${About.error}.`));
    if (!About.bodyEl.firstChild) About.bodyEl.append(h('p', { class: 'muted' }, 'The scenario says nothing more about this person.'));
  }

  // ------------------------------------------------------------------ the transcript

  function ensureTurn(number) {
    let turn = S.turns.get(number);
    if (turn) return turn;
    const headingId = `turn-${number}-h`;
    turn = {
      turn: number,
      text: '',
      source: null,
      markers: new Set(),
      answers: new Map(),
      el: h('section', { class: 'turn', id: `turn-${number}`, 'aria-labelledby': headingId }),
    };
    turn.headEl = h('h2', { class: 'turn-label', id: headingId });
    turn.textEl = h('p', { class: 'patient-text' });
    turn.markersEl = h('p', { class: 'turn-markers', hidden: true });
    turn.patientEl = h('div', { class: 'patient' }, turn.headEl, turn.textEl, turn.markersEl);
    turn.answersEl = h('div', { class: 'answers', style: `--columns: ${Math.max(1, S.targets.length)}` });
    turn.el.append(turn.patientEl, turn.answersEl);
    S.turns.set(number, turn);
    S.lastTurn = Math.max(S.lastTurn, number);
    // Keep turns in order, whatever order they were created in.
    const transcript = $('transcript');
    const later = Array.from(transcript.querySelectorAll(':scope > .turn')).find(
      (el) => Number(el.id.slice(5)) > number,
    );
    transcript.insertBefore(turn.el, later || null);
    $('transcript-empty').hidden = true;
    for (const t of S.targets) ensureAnswer(number, t.alias);
    renderTurnHead(turn);
    return turn;
  }

  function renderTurnHead(turn) {
    clear(turn.headEl);
    turn.headEl.append(
      h('span', { class: 'turn-number' }, `Turn ${turn.turn}`),
      h('span', { class: 'turn-who' }, ' · patient (you)'),
      turn.source ? h('span', { class: 'turn-source muted' }, ` · ${SOURCE_WORDS[turn.source] || turn.source}`) : null,
    );
    turn.markersEl.hidden = turn.markers.size === 0 && !turn.markerMsg;
    clear(turn.markersEl);
    for (const m of turn.markers) {
      const def = S.started && S.started.markers.find((x) => x.id === m);
      // A marker set by mistake can be removed (`unmark`) while the session runs.
      const removable = !S.ended;
      const removing = turn.unmarking && turn.unmarking.has(m);
      turn.markersEl.append(
        h(
          'span',
          { class: 'tag marker-tag', title: def ? def.text : null },
          `marker: ${m}`,
          removable
            ? h(
                'button',
                {
                  type: 'button',
                  class: 'marker-remove',
                  'aria-label': `Remove the marker ${m} from turn ${turn.turn}`,
                  title: `Remove the marker ${m} from turn ${turn.turn}`,
                  disabled: removing,
                  onclick: () => unmark(turn, m),
                },
                h('span', { 'aria-hidden': 'true' }, removing ? '…' : '×'),
              )
            : null,
        ),
        ' ',
      );
    }
    if (turn.markerMsg) turn.markersEl.append(h('span', { class: 'form-error small marker-error', role: 'alert' }, turn.markerMsg));
  }

  function unmark(turn, marker) {
    turn.unmarking = turn.unmarking || new Set();
    if (turn.unmarking.has(marker)) return;
    turn.unmarking.add(marker);
    turn.markerMsg = '';
    renderTurnHead(turn);
    const done = () => {
      turn.unmarking.delete(marker);
      renderTurnHead(turn);
    };
    command(
      { type: 'unmark', marker, turn: turn.turn },
      {
        onAck: done,
        onError: (ev, words) => {
          turn.markerMsg =
            ev.code === 'unknown_type'
              ? 'Could not remove the marker: this server cannot remove markers yet.'
              : `Could not remove the marker: ${words}`;
          done();
        },
      },
    );
  }

  function onPatient(ev) {
    const stick = isAtBottom();
    const turn = ensureTurn(ev.turn);
    turn.text = ev.text;
    turn.source = ev.source;
    for (const m of ev.markers || []) turn.markers.add(m);
    turn.textEl.textContent = ev.text;
    renderTurnHead(turn);
    // The offered line (if any) is used up; the next one is offered once the answers are in.
    if (S.started && S.started.mode === 'scripted') {
      S.offered = undefined;
      renderOffered();
    }
    if (stick || S.justSent) scrollToBottom();
    S.justSent = false;
  }

  function onMarked(ev) {
    const turn = ensureTurn(ev.turn);
    turn.markers.add(ev.marker);
    turn.markerMsg = '';
    renderTurnHead(turn);
    renderMarkers();
    if (S.replayDone) announce(`Marker ${ev.marker} set on turn ${ev.turn}.`);
  }

  function onUnmarked(ev) {
    const turn = ensureTurn(ev.turn);
    // Ours when this page asked for it (the event comes before the `ack`).
    const ours = !!(turn.unmarking && turn.unmarking.has(ev.marker));
    turn.markers.delete(ev.marker);
    turn.markerMsg = '';
    renderTurnHead(turn);
    renderMarkers();
    if (!S.replayDone) return;
    announce(`Marker ${ev.marker} removed from turn ${ev.turn}.`);
    if (!ours) return;
    // The marker buttons only mark the latest turn: an earlier one is put back from here.
    toast(`Marker “${ev.marker}” removed from turn ${ev.turn}.`, {
      kind: 'info',
      timeout: 15000,
      actions: S.ended ? [] : [['Put it back', () => command({ type: 'mark', marker: ev.marker, turn: ev.turn }, { onError: (_e, words) => toast(`The marker was not put back: ${words}`) })]],
    });
  }

  function onPreferred(ev) {
    S.preferred.set(ev.turn, ev.target);
    const turn = S.turns.get(ev.turn);
    if (turn) for (const answer of turn.answers.values()) renderAnswerActions(answer);
  }

  // ------------------------------------------------------------------ answers
  //
  // An answer is one target's reply to one turn. It can be asked again (`regenerate`), so it
  // has attempts: the answer object holds the latest attempt, and `earlier` keeps the ones it
  // replaced (they stay recorded and rated, shown collapsed above). An event without `attempt`
  // is about attempt 1.

  /** The fields that belong to one attempt at an answer. */
  function freshAttempt(attempt) {
    return {
      attempt,
      chars: [], // the text so far, one Unicode character per entry
      text: '',
      final: null, // the `answer` event
      errors: [], // durable `error` events about this attempt
      rules: null, // the rules' rating
      others: new Map(), // rater -> latest rating (humans, judges)
      awaiting: null, // the rules' rating's `awaiting`: criteria only a judge or human can rate
    };
  }

  function ensureAnswer(turnNumber, alias) {
    const turn = ensureTurn(turnNumber);
    let answer = turn.answers.get(alias);
    if (answer) return answer;
    answer = { turn: turnNumber, alias, earlier: [], ...freshAttempt(1) };
    const base = `a-${turnNumber}-${safeId(alias)}`;
    answer.headEl = h('h3', { class: 'answer-head', id: `${base}-h` });
    answer.stateEl = h('p', { class: 'answer-state' });
    answer.earlierEl = h('div', { class: 'earlier-attempts', hidden: true });
    Object.assign(answer, attemptElements(`Criteria for answer ${alias}, turn ${turnNumber}`));
    answer.othersEl = h('div', { class: 'other-ratings', hidden: true });
    answer.actionsEl = h('div', { class: 'answer-actions', hidden: true });
    answer.el = h(
      'article',
      { class: 'answer is-waiting', id: base, 'aria-labelledby': `${base}-h`, 'data-target': alias },
      h('header', { class: 'answer-top' }, answer.headEl, answer.stateEl),
      answer.earlierEl,
      answer.reasoningEl,
      answer.textEl,
      answer.errorEl,
      answer.metaEl,
      answer.verdictsEl,
      answer.othersEl,
      answer.actionsEl,
    );
    turn.answers.set(alias, answer);
    // Columns follow the order of `started.targets`.
    const order = S.targets.map((t) => t.alias);
    const after = Array.from(turn.answersEl.children).find(
      (el) => order.indexOf(el.dataset.target) > order.indexOf(alias),
    );
    turn.answersEl.insertBefore(answer.el, after || null);
    renderAnswer(answer);
    return answer;
  }

  /** The elements an attempt's text, errors, timing and verdicts are drawn into. */
  function attemptElements(verdictsLabel) {
    return {
      reasoningEl: h('details', { class: 'answer-reasoning', hidden: true }),
      textEl: h('div', { class: 'answer-text' }),
      errorEl: h('p', { class: 'answer-error', hidden: true }),
      metaEl: h('p', { class: 'answer-meta muted', hidden: true }),
      verdictsEl: h('section', { class: 'verdicts', hidden: true, 'aria-label': verdictsLabel }),
    };
  }

  /**
   * The record of attempt `n` of an answer. A newer attempt than the latest one moves the
   * latest into `earlier` (with its own elements) and starts afresh; an older one is found there.
   */
  function attemptOf(answer, n) {
    const attempt = Number.isInteger(n) && n > 0 ? n : 1;
    if (attempt === answer.attempt) return answer;
    if (attempt < answer.attempt) {
      let rec = answer.earlier.find((e) => e.attempt === attempt);
      if (!rec) {
        rec = earlierRecord(answer, freshAttempt(attempt));
        answer.earlier.push(rec);
        answer.earlier.sort((a, b) => a.attempt - b.attempt);
      }
      return rec;
    }
    const kept = {};
    for (const key of Object.keys(freshAttempt(0))) kept[key] = answer[key];
    answer.earlier.push(earlierRecord(answer, kept));
    Object.assign(answer, freshAttempt(attempt));
    dirty.delete(answer);
    answer.verdictsEl.dataset.closed = '';
    return answer;
  }

  function earlierRecord(answer, fields) {
    const rec = { turn: answer.turn, alias: answer.alias, ...fields };
    Object.assign(rec, attemptElements(`Criteria for attempt ${rec.attempt} of answer ${answer.alias}, turn ${answer.turn}`));
    rec.verdictsEl.dataset.closed = 'true'; // compact: its criteria list opens on request
    rec.summaryEl = h('summary', { class: 'earlier-summary' });
    rec.el = h('details', { class: 'earlier-attempt' }, rec.summaryEl, rec.reasoningEl, rec.textEl, rec.errorEl, rec.metaEl, rec.verdictsEl);
    return rec;
  }

  // Deltas are drawn at most once per frame.
  const dirty = new Set();
  let frame = 0;

  function onDelta(ev) {
    const answer = ensureAnswer(ev.turn, ev.target);
    if (attemptOf(answer, ev.attempt) !== answer) return; // a late piece of an attempt replaced since
    if (answer.final) return; // the authoritative text is in
    const offset = Math.max(0, Number(ev.offset) || 0);
    const piece = Array.from(ev.text || '');
    if (offset === answer.chars.length) {
      answer.chars.push(...piece);
      answer.text += ev.text || '';
    } else {
      answer.chars.length = Math.min(offset, answer.chars.length);
      answer.chars.push(...piece);
      answer.text = answer.chars.join('');
    }
    dirty.add(answer);
    if (!frame) frame = window.requestAnimationFrame(flushDeltas);
  }

  function flushDeltas() {
    frame = 0;
    const stick = isAtBottom();
    for (const answer of dirty) {
      if (answer.final) continue;
      if (answer.el.classList.contains('is-waiting')) renderAnswer(answer);
      else answer.textEl.textContent = answer.text;
    }
    dirty.clear();
    if (stick) scrollToBottom();
  }

  function onAnswer(ev) {
    const stick = isAtBottom();
    const answer = ensureAnswer(ev.turn, ev.target);
    const rec = attemptOf(answer, ev.attempt);
    rec.final = ev;
    rec.text = ev.text || '';
    rec.chars = Array.from(rec.text);
    if (rec === answer) dirty.delete(answer);
    renderAnswer(answer);
    if (stick) scrollToBottom();
    if (rec === answer && S.replayDone && !isStreaming() && S.lastTurn === ev.turn) {
      announce(`All answers to turn ${ev.turn} are in.`);
    }
  }

  function onRating(ev) {
    const answer = ensureAnswer(ev.turn, ev.target);
    const rec = attemptOf(answer, ev.attempt);
    if (ev.rater === 'rules') {
      rec.rules = ev;
      // Which criteria await a judge or a human is the server's word (`awaiting`), never worked
      // out here: only the server knows which windows a marker on this very turn opened.
      rec.awaiting = Array.isArray(ev.awaiting) ? ev.awaiting : null;
    } else rec.others.set(ev.rater, ev);
    renderAnswer(answer);
    if (rec === answer && answer.rateForm) renderRateCriteria(answer);
  }

  /** `regenerating`: a new attempt at an answer starts; the one it replaces stays, collapsed. */
  function onRegenerating(ev) {
    const stick = isAtBottom();
    const answer = ensureAnswer(ev.turn, ev.target);
    attemptOf(answer, ev.attempt);
    renderAnswer(answer);
    if (stick) scrollToBottom();
    if (S.replayDone) announce(`Asking target ${ev.target} again for turn ${ev.turn} (attempt ${answer.attempt}).`);
  }

  function finishBadge(answer) {
    const finish = answer.final && answer.final.finish;
    if (!finish || finish === 'stop' || finish === 'end_turn') return null;
    const word = FINISH_WORDS[finish] || finish;
    return h('span', { class: `badge finish finish-${safeId(finish)}` }, word);
  }

  /** Whether an answer (its latest attempt) went wrong, so asking again is the obvious next step. */
  function answerWentWrong(answer) {
    const f = answer.final;
    if (!f) return false;
    return ['error', 'interrupted', 'stopped', 'length'].includes(f.finish) || !!f.error || !f.text;
  }

  function renderAnswer(answer) {
    const streaming = !answer.final && !S.ended;
    const waiting = streaming && answer.chars.length === 0 && answer.errors.length === 0;
    answer.el.classList.toggle('is-waiting', waiting);
    answer.el.classList.toggle('is-streaming', streaming && !waiting);
    answer.el.classList.toggle('is-final', !!answer.final);

    // Heading: alias, then the name when it is known.
    clear(answer.headEl);
    answer.headEl.append(h('span', { class: 'alias' }, answer.alias));
    const name = targetNameNodes(answer.alias);
    if (name) answer.headEl.append(' ', name);

    // State: attempt / waiting / answering / finish badge / preferred.
    clear(answer.stateEl);
    if (answer.attempt > 1) answer.stateEl.append(h('span', { class: 'badge attempt-badge' }, `attempt ${answer.attempt}`));
    if (waiting) answer.stateEl.append(h('span', { class: 'muted' }, 'waiting for the first words…'));
    else if (streaming) answer.stateEl.append(h('span', { class: 'muted streaming-word' }, 'answering…'));
    else if (!answer.final && S.ended) answer.stateEl.append(h('span', { class: 'badge finish' }, 'no answer'));
    answer.stateEl.append(finishBadge(answer) || '');
    if (S.preferred.get(answer.turn) === answer.alias) {
      answer.stateEl.append(' ', h('span', { class: 'badge badge-preferred' }, 'preferred'));
    }

    renderEarlierAttempts(answer);
    renderAttemptBody(answer);
    renderOtherRatings(answer);
    renderAnswerActions(answer);
  }

  /** An attempt's text (with evidence once final), errors, timing and verdicts. */
  function renderAttemptBody(rec) {
    if (rec.final) renderHighlightedText(rec);
    else rec.textEl.textContent = rec.text;
    if (rec.final && !rec.text) {
      rec.textEl.textContent = '';
      rec.textEl.append(h('span', { class: 'muted' }, '(no text)'));
    }

    // Errors: the answer's own error, and durable error events (once each).
    const errors = [];
    if (rec.final && rec.final.error) errors.push(rec.final.error);
    for (const e of rec.errors) {
      if (!errors.some((x) => x.code === e.code && x.message === e.message)) errors.push(e);
    }
    rec.errorEl.hidden = errors.length === 0;
    clear(rec.errorEl);
    errors.forEach((e) => {
      const plain = TARGET_ERROR_WORDS[e.code];
      rec.errorEl.append(
        h(
          'span',
          { class: 'answer-error-item' },
          h('strong', { text: plain || errorWords(e) }),
          rec.final && rec.text ? ' The text so far is kept.' : null,
          h('span', { class: 'answer-error-detail' }, plain ? `${errorWords(e)} (${e.code})` : `(${e.code})`),
        ),
      );
    });
    if (rec.final && rec.final.finish === 'interrupted' && errors.length === 0) {
      rec.errorEl.hidden = false;
      rec.errorEl.append('The server stopped before this answer was complete; the text so far is kept.');
    }

    // A reasoning model's thinking: collapsed, for reviewers; never what was rated.
    const f = rec.final;
    const reasoning = f && f.reasoning;
    rec.reasoningEl.hidden = !reasoning;
    clear(rec.reasoningEl);
    if (reasoning) {
      rec.reasoningEl.append(
        h('summary', { text: 'How the model reasoned first (not rated, not shown to the patient)' }),
        h('div', { class: 'reasoning-text', text: reasoning }),
      );
    }

    // Timing, and what else the answer says about itself.
    rec.metaEl.hidden = !f;
    if (f) {
      const bits = [];
      if (f.refusal) bits.push('given as a refusal');
      if (typeof f.queue_ms === 'number') bits.push(`waited ${formatDuration(f.queue_ms)} for the model’s server`);
      if (typeof f.ttft_ms === 'number') bits.push(`first words after ${formatDuration(f.ttft_ms)}`);
      if (typeof f.duration_ms === 'number') bits.push(`${formatDuration(f.duration_ms)} in all`);
      if (typeof f.tokens === 'number') bits.push(plural(f.tokens, 'token', 'tokens'));
      if (typeof f.dropped_turns === 'number') {
        bits.push(`the first ${plural(f.dropped_turns, 'patient line was', 'patient lines were')} left out to fit the model’s context`);
      }
      rec.metaEl.textContent = bits.join(' · ');
      rec.metaEl.hidden = bits.length === 0;
    }

    renderVerdicts(rec);
  }

  /** The attempts an answer replaced, each collapsed: "Earlier attempt 1 · error: … (kept)". */
  function renderEarlierAttempts(answer) {
    answer.earlierEl.hidden = answer.earlier.length === 0;
    for (const rec of answer.earlier) {
      if (rec.el.parentNode !== answer.earlierEl) answer.earlierEl.append(rec.el);
      const f = rec.final;
      let why;
      if (!f) why = 'unfinished';
      else if (f.error) why = `error: ${f.error.message || TARGET_ERROR_WORDS[f.error.code] || f.error.code}`;
      else if (f.finish && FINISH_WORDS[f.finish]) why = FINISH_WORDS[f.finish];
      else if (!rec.text) why = 'no text';
      else why = 'finished';
      rec.summaryEl.textContent = `Earlier attempt ${rec.attempt} · ${why} (kept)`;
      renderAttemptBody(rec);
    }
  }

  // --- evidence: UTF-8 byte offsets -> string positions

  const encoder = new TextEncoder();
  const decoder = new TextDecoder();

  function evidenceRange(text, bytes, evidence) {
    if (!evidence) return null;
    const { start, end, quote } = evidence;
    if (Number.isInteger(start) && Number.isInteger(end) && start >= 0 && end > start && end <= bytes.length) {
      const from = decoder.decode(bytes.subarray(0, start)).length;
      const to = from + decoder.decode(bytes.subarray(start, end)).length;
      if (!quote || text.slice(from, to) === quote) return [from, to];
    }
    if (quote) {
      const at = text.indexOf(quote);
      if (at >= 0) return [at, at + quote.length];
    }
    return null;
  }

  /** Whether a verdict is good, bad or neither for this criterion. */
  function verdictTone(criterion, verdict) {
    if (verdict === 'unsure') return 'awaiting';
    if (!criterion) return 'neutral';
    if (criterion.kind === 'must_not') return verdict === 'present' ? 'bad' : 'good';
    if (verdict === 'present') return 'good';
    // A conversation-scope requirement absent from one answer is not (yet) a failure.
    return criterion.scope === 'conversation' ? 'neutral' : 'bad';
  }

  function renderHighlightedText(answer) {
    const text = answer.text;
    clear(answer.textEl);
    const ranges = [];
    const ratings = [answer.rules, ...answer.others.values()].filter(Boolean);
    if (ratings.some((r) => r.verdicts.some((v) => v.evidence))) {
      const bytes = encoder.encode(text);
      for (const rating of ratings) {
        for (const v of rating.verdicts) {
          if (v.verdict !== 'present') continue;
          const range = evidenceRange(text, bytes, v.evidence);
          if (!range) continue;
          const c = S.criteria.get(v.criterion);
          const title = `${c ? c.text : v.criterion} (${verdictWord(c, v.verdict, rating.rater)})`;
          ranges.push({ from: range[0], to: range[1], titles: [title], ids: [v.criterion], tone: verdictTone(c, v.verdict) });
        }
      }
    }
    if (!ranges.length) {
      answer.textEl.textContent = text;
      return;
    }
    ranges.sort((a, b) => a.from - b.from || b.to - a.to);
    const merged = [];
    for (const r of ranges) {
      const last = merged[merged.length - 1];
      if (last && r.from < last.to) {
        last.to = Math.max(last.to, r.to);
        last.ids.push(...r.ids);
        last.titles.push(...r.titles);
        if (r.tone === 'bad') last.tone = 'bad';
      } else merged.push({ ...r, ids: [...r.ids], titles: [...r.titles] });
    }
    let at = 0;
    for (const r of merged) {
      if (r.from > at) answer.textEl.append(text.slice(at, r.from));
      // The title says what the span is evidence of, and whether that is good or bad, in words.
      answer.textEl.append(
        h('mark', { class: `evidence evidence-${r.tone}`, title: r.titles.join(' · '), 'data-criteria': r.ids.join(' ') }, text.slice(r.from, r.to)),
      );
      at = r.to;
    }
    if (at < text.length) answer.textEl.append(text.slice(at));
  }

  function verdictRow(criterionId, verdict, { rater, evidence, awaitingReason } = {}) {
    const c = S.criteria.get(criterionId);
    const tone = verdict ? verdictTone(c, verdict) : 'awaiting';
    const label = verdictWord(c, verdict, rater);
    const detail = [];
    if (c) detail.push(`${KIND_WORDS[c.kind] || c.kind} · ${c.severity}`);
    if (rater && rater !== 'rules') detail.push(`rated by ${rater}`);
    const quote =
      evidence && evidence.quote
        ? h('q', { class: 'verdict-quote', title: evidence.reason || null }, evidence.quote)
        : null;
    const reason =
      evidence && evidence.reason && rater && !rater.startsWith('rules') && !rater.startsWith('human')
        ? h('span', { class: 'verdict-reason muted' }, evidence.reason)
        : null;
    return h(
      'li',
      { class: `verdict tone-${tone}`, 'data-criterion': criterionId },
      h('span', { class: `verdict-label tone-${tone}` }, label),
      h(
        'span',
        { class: 'verdict-body' },
        h('span', { class: 'verdict-text' }, c ? c.text : criterionId),
        h('span', { class: 'verdict-detail muted' }, detail.join(' · ')),
        quote,
        reason,
        awaitingReason ? h('span', { class: 'verdict-reason muted' }, awaitingReason) : null,
      ),
    );
  }

  function renderVerdicts(answer) {
    const el = answer.verdictsEl;
    clear(el);
    if (!answer.final) {
      el.hidden = true;
      return;
    }
    if (!answer.text) {
      el.hidden = false;
      el.append(h('p', { class: 'muted small' }, 'Nothing to rate against the criteria: this answer has no text.'));
      return;
    }
    // The effective verdict per criterion: a human's over a judge's over the rules'.
    const rank = (rater) => (rater.startsWith('human') ? 3 : rater.startsWith('judge') ? 2 : 1);
    const best = new Map();
    const ratings = [answer.rules, ...answer.others.values()].filter(Boolean);
    for (const rating of ratings) {
      for (const v of rating.verdicts) {
        const had = best.get(v.criterion);
        if (!had || rank(rating.rater) > rank(had.rater) || (rank(rating.rater) === rank(had.rater) && rating.created_at >= had.created_at)) {
          best.set(v.criterion, { ...v, rater: rating.rater, created_at: rating.created_at });
        }
      }
    }
    const rows = [];
    const order = Array.from(S.criteria.keys());
    const listed = new Set();
    for (const id of order) {
      const v = best.get(id);
      if (!v) continue;
      listed.add(id);
      rows.push(
        verdictRow(id, v.verdict, {
          rater: v.rater,
          evidence: v.evidence,
          awaitingReason:
            v.verdict === 'unsure'
              ? v.rater === 'rules'
                ? 'The rules could not decide (the answer was cut short): awaits a judge or human rating.'
                : null
              : null,
        }),
      );
    }
    // Criteria only a judge or a human can rate, as the rules' rating listed them (none before it).
    for (const id of answer.awaiting || []) {
      if (listed.has(id)) continue;
      listed.add(id);
      rows.push(verdictRow(id, null, { awaitingReason: 'Only a judge or a human can rate this.' }));
    }
    if (!rows.length) {
      el.hidden = !answer.final;
      el.append(h('p', { class: 'muted small' }, answer.text ? 'Waiting for the rules’ rating…' : 'Nothing to rate: the answer has no text.'));
      if (answer.rules) { clear(el); el.append(h('p', { class: 'muted small' }, 'No criterion applies to this answer.')); }
      return;
    }
    el.hidden = false;
    const tally = new Map();
    for (const row of rows) {
      const word = row.querySelector('.verdict-label').textContent;
      tally.set(word, (tally.get(word) || 0) + 1);
    }
    const summary = Array.from(tally, ([word, n]) => `${n} ${word}`).join(' · ');
    const wasOpen = el.dataset.closed !== 'true';
    const details = h(
      'details',
      { class: 'verdicts-details', open: wasOpen },
      h('summary', {}, 'Criteria for this answer ', h('span', { class: 'verdicts-tally' }, `(${summary})`)),
      h('ul', { class: 'verdict-list' }, rows),
    );
    details.addEventListener('toggle', () => {
      el.dataset.closed = details.open ? 'false' : 'true';
    });
    el.append(details);
  }

  function renderOtherRatings(answer) {
    const el = answer.othersEl;
    clear(el);
    const ratings = Array.from(answer.others.values());
    el.hidden = ratings.length === 0;
    for (const r of ratings) {
      const scores = DIMENSIONS.filter(([key]) => r.scores && r.scores[key] != null).map(
        ([key, word]) => `${word} ${r.scores[key]}/5`,
      );
      for (const [key, value] of Object.entries(r.scores || {})) {
        if (!DIMENSIONS.some(([k]) => k === key)) scores.push(`${key} ${value}/5`);
      }
      el.append(
        h(
          'div',
          { class: 'other-rating' },
          h('p', { class: 'other-rating-head' }, h('strong', { text: r.rater.startsWith('human') ? 'Human rating' : r.rater.startsWith('judge') ? 'Judge rating' : 'Rating' }), h('span', { class: 'muted' }, ` · ${r.rater} · ${formatTime(r.created_at)}`)),
          scores.length ? h('p', {}, scores.join(' · ')) : null,
          r.verdicts && r.verdicts.length ? h('p', { class: 'muted small' }, `${plural(r.verdicts.length, 'verdict', 'verdicts')} (shown in the list above)`) : null,
          r.flags && r.flags.length ? h('p', {}, `Flags: ${r.flags.join(', ')}`) : null,
          r.note ? h('p', {}, h('span', { class: 'muted' }, 'Note: '), r.note) : null,
          r.rewrite ? h('div', { class: 'rewrite' }, h('p', { class: 'muted small' }, 'A better answer:'), h('p', { class: 'rewrite-text' }, r.rewrite)) : null,
        ),
      );
    }
  }

  function renderAnswerActions(answer) {
    const el = answer.actionsEl;
    if (!answer.final) {
      el.hidden = true;
      return;
    }
    el.hidden = false;
    if (!answer.rateDetails) {
      answer.preferBtn = h('button', { type: 'button', class: 'button small', 'aria-pressed': 'false' }, 'Prefer this answer');
      answer.preferBtn.addEventListener('click', () => prefer(answer));
      answer.askBtn = h('button', { type: 'button', class: 'button small', hidden: true }, 'Ask again');
      answer.askBtn.addEventListener('click', () => askAgain(answer));
      answer.actionMsg = h('p', { class: 'form-error small', role: 'alert', hidden: true });
      answer.rateDetails = h('details', { class: 'rate' }, h('summary', { class: 'button small' }, 'Rate'));
      answer.rateDetails.addEventListener('toggle', () => {
        if (answer.rateDetails.open && !answer.rateForm) buildRateForm(answer);
      });
      answer.rateStatus = h('p', { class: 'form-ok', role: 'status' });
      el.append(h('div', { class: 'answer-buttons' }, answer.askBtn, answer.preferBtn), answer.rateDetails, answer.rateStatus, answer.actionMsg);
    }
    const several = S.targets.length > 1;
    const preferred = S.preferred.get(answer.turn) === answer.alias;
    answer.preferBtn.hidden = !several || !answer.text;
    answer.preferBtn.setAttribute('aria-pressed', preferred ? 'true' : 'false');
    answer.preferBtn.textContent = preferred ? 'Preferred' : 'Prefer this answer';
    answer.preferBtn.disabled = !!answer.preferPending;
    renderAskAgain(answer);
  }

  /**
   * "Ask again" (`regenerate`): offered on the latest turn's finished answers while nothing
   * streams, and made prominent when the answer failed, was cut short or came back empty.
   * Called after every event (from updateControls), so it only touches the button on a change.
   */
  function renderAskAgain(answer) {
    const button = answer.askBtn;
    if (!button) return;
    const available = !!answer.final && !S.ended && answer.turn === S.lastTurn && !isStreaming();
    const wrong = available && answerWentWrong(answer);
    const key = `${available}|${wrong}|${!!answer.askPending}|${answer.attempt}`;
    if (button.dataset.key !== key) {
      button.dataset.key = key;
      button.hidden = !available;
      button.className = wrong ? 'button small primary ask-again' : 'button small ask-again';
      button.disabled = !!answer.askPending;
      button.textContent = answer.askPending ? 'Asking again…' : 'Ask again';
      button.setAttribute(
        'aria-label',
        `Ask again: target ${answer.alias}, turn ${answer.turn}${wrong ? ', this answer did not complete' : ''} (this answer is kept)`,
      );
    }
    const group = button.parentElement;
    const empty = button.hidden && answer.preferBtn.hidden;
    if (group.hidden !== empty) group.hidden = empty;
  }

  function askAgain(answer) {
    if (answer.askPending) return;
    answer.askPending = true;
    answer.actionMsg.hidden = true;
    renderAskAgain(answer);
    const done = () => {
      answer.askPending = false;
      renderAnswerActions(answer);
    };
    command(
      { type: 'regenerate', turn: answer.turn, target: answer.alias },
      {
        onAck: done,
        onError: (ev, words) => {
          done();
          const why = ev.code === 'unknown_type' ? 'this server cannot ask a model again yet.' : words;
          showInline(answer.actionMsg, `Could not ask again: ${why}`);
        },
      },
    );
  }

  function prefer(answer) {
    if (S.preferred.get(answer.turn) === answer.alias) return;
    answer.preferPending = true;
    answer.actionMsg.hidden = true;
    renderAnswerActions(answer);
    command(
      { type: 'prefer', turn: answer.turn, target: answer.alias },
      {
        onAck: () => {
          answer.preferPending = false;
          renderAnswerActions(answer);
        },
        onError: (_ev, words) => {
          answer.preferPending = false;
          renderAnswerActions(answer);
          showInline(answer.actionMsg, `Could not record the preference: ${words}`);
        },
      },
    );
  }

  // --- the rating form

  /**
   * The verdict rows of an answer's rating form. First the criteria the server says are at
   * stake for this answer: those the rules rated, the rules' `awaiting` list, and those the
   * latest `criteria` event has awaiting a rating for this target (a marker set since may have
   * opened them). The others follow, folded. Nothing is worked out here: before the rules'
   * rating is in, every criterion is listed once, in the scenario's order. Rebuilt when the
   * rules' rating arrives, keeping what was already chosen.
   */
  function renderRateCriteria(answer) {
    const fieldset = answer.rateCriteriaEl;
    const chosen = new Map(Array.from(fieldset.querySelectorAll('select'), (select) => [select.name, select.value]));
    const moreOpen = !!fieldset.querySelector('details.rate-more[open]');
    const base = `rate-${answer.turn}-${safeId(answer.alias)}`;
    const row = (c) => {
      const id = `${base}-c-${safeId(c.id)}`;
      const name = `criterion:${c.id}`;
      const forbidden = c.kind === 'must_not';
      const select = h(
        'select',
        { id, name },
        h('option', { value: '' }, 'not rated'),
        h('option', { value: 'present' }, forbidden ? 'occurred (present)' : 'present'),
        h('option', { value: 'absent' }, forbidden ? 'avoided (absent)' : 'absent'),
        h('option', { value: 'unsure' }, 'unsure'),
      );
      select.value = chosen.get(name) || '';
      return h(
        'div',
        { class: 'rate-row' },
        h('label', { for: id }, h('span', { class: 'rate-crit' }, c.text), h('span', { class: 'muted small' }, `${KIND_WORDS[c.kind] || c.kind} · ${c.severity}`)),
        select,
      );
    };
    const all = Array.from(S.criteria.values());
    clear(fieldset);
    // A rating is of the latest attempt (`rate` names no attempt).
    fieldset.append(h('legend', {}, answer.attempt > 1 ? `Verdict per criterion, for attempt ${answer.attempt}` : 'Verdict per criterion'));
    if (!answer.rules) {
      append(fieldset, [
        h('p', { class: 'muted small' }, 'Which criteria are at stake for this answer is known once the rules’ rating is in; every criterion is listed meanwhile.'),
        all.map(row),
      ]);
      return;
    }
    const status = S.statuses.get(answer.alias);
    const atStake = new Set([
      ...answer.rules.verdicts.map((v) => v.criterion),
      ...(answer.awaiting || []),
      ...(status ? status.criteria.filter((c) => c.status === 'awaiting').map((c) => c.id) : []),
    ]);
    const first = all.filter((c) => atStake.has(c.id));
    const rest = all.filter((c) => !atStake.has(c.id));
    append(fieldset, [
      first.map(row),
      rest.length
        ? h('details', { class: 'rate-more', open: moreOpen }, h('summary', {}, `Other criteria, not rated or awaited for this answer (${rest.length})`), rest.map(row))
        : null,
    ]);
  }

  function buildRateForm(answer) {
    const base = `rate-${answer.turn}-${safeId(answer.alias)}`;
    answer.rateCriteriaEl = h('fieldset', {});
    renderRateCriteria(answer);
    const error = h('p', { class: 'form-error', role: 'alert', hidden: true });
    const status = answer.rateStatus;
    const submit = h('button', { type: 'submit', class: 'button primary small' }, 'Save rating');
    const form = h(
      'form',
      { class: 'rate-form', novalidate: true },
      answer.rateCriteriaEl,
      h(
        'fieldset',
        { class: 'rate-scores' },
        h('legend', {}, 'Scores (1 = poor, 5 = excellent)'),
        DIMENSIONS.map(([key, word]) => {
          const id = `${base}-s-${key}`;
          return h(
            'div',
            { class: 'rate-score' },
            h('label', { for: id }, word),
            h('select', { id, name: `score:${key}` }, h('option', { value: '' }, '–'), [1, 2, 3, 4, 5].map((n) => h('option', { value: n }, String(n)))),
          );
        }),
      ),
      h('div', { class: 'field' }, h('label', { for: `${base}-note` }, 'Note'), h('textarea', { id: `${base}-note`, name: 'note', rows: 2 })),
      h(
        'div',
        { class: 'field' },
        h('label', { for: `${base}-rewrite` }, 'A better answer ', h('span', { class: 'optional' }, '(optional)')),
        h('textarea', { id: `${base}-rewrite`, name: 'rewrite', rows: 3 }),
      ),
      error,
      h('div', { class: 'actions' }, submit),
    );
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      const criteria = {};
      const scores = {};
      for (const select of form.querySelectorAll('select')) {
        if (!select.value) continue;
        const [kind, key] = [select.name.slice(0, select.name.indexOf(':')), select.name.slice(select.name.indexOf(':') + 1)];
        if (kind === 'criterion') criteria[key] = select.value;
        else scores[key] = Number(select.value);
      }
      const note = form.elements.note.value.trim() || null;
      const rewrite = form.elements.rewrite.value.trim() || null;
      status.textContent = '';
      if (!Object.keys(criteria).length && !Object.keys(scores).length && !note && !rewrite) {
        showInline(error, 'Choose at least one verdict or score, or write a note, before saving.');
        return;
      }
      // The server refuses a longer note or rewrite; say so here, keeping the text.
      const tooLong = [
        [note, 'The note', form.elements.note],
        [rewrite, 'The better answer', form.elements.rewrite],
      ].find(([text]) => text && charCount(text) > MAX_NOTE_CHARS);
      if (tooLong) {
        showInline(error, `${tooLong[1]} has ${count(charCount(tooLong[0]))} characters; the limit is ${count(MAX_NOTE_CHARS)}.`);
        tooLong[2].focus();
        return;
      }
      error.hidden = true;
      submit.disabled = true;
      status.textContent = 'Saving…';
      command(
        { type: 'rate', turn: answer.turn, target: answer.alias, criteria, scores, flags: [], note, rewrite },
        {
          onAck: () => {
            submit.disabled = false;
            form.reset();
            answer.rateDetails.open = false;
            status.textContent = 'Rating saved. Rating again replaces it.';
            answer.rateDetails.querySelector('summary').focus();
          },
          onError: (_ev, words) => {
            submit.disabled = false;
            status.textContent = '';
            showInline(error, `Not saved: ${words}`);
          },
        },
      );
    });
    answer.rateForm = form;
    answer.rateDetails.append(form);
  }

  // ------------------------------------------------------------------ criteria panel

  function onCriteria(ev) {
    for (const t of ev.targets) S.statuses.set(t.target, t);
    renderCriteria();
    // What awaits a rating may have changed (a marker, a rating): rating forms follow.
    for (const turn of S.turns.values()) {
      for (const answer of turn.answers.values()) if (answer.rateForm) renderRateCriteria(answer);
    }
  }

  function statusDetail(c) {
    switch (c.status) {
      case 'met':
      case 'violated':
        return [c.turn != null ? `turn ${c.turn}` : null, c.rater || null].filter(Boolean).join(' · ');
      case 'pending':
        return c.deadline != null ? `by turn ${c.deadline}` : 'open until the end';
      case 'missed':
        return c.deadline != null ? `deadline was turn ${c.deadline}` : 'not shown by the end';
      case 'awaiting':
        return c.note ? '' : 'needs a judge or human rating';
      default:
        return '';
    }
  }

  function outcomeChip(outcome) {
    return h('span', { class: `outcome outcome-${safeId(outcome || 'in_progress')}` }, OUTCOME_WORDS[outcome] || outcome || 'in progress');
  }

  /**
   * "4 met · 6 avoided · 1 awaiting a rating": what the criteria are, in the words of their
   * statuses. Tallied from the server's per-criterion statuses when they are at hand (so a
   * forbidden behaviour avoided is not counted as "met"), else from its `counts`.
   */
  function countsText(counts, criteria) {
    let parts;
    if (criteria && criteria.length) {
      const tally = new Map();
      for (const c of criteria) {
        const word = statusWord(c);
        tally.set(word, (tally.get(word) || 0) + 1);
      }
      const order = ['met', 'avoided', 'not met', 'occurred', 'missed', 'pending', 'awaiting a rating', 'does not apply'];
      parts = Array.from(tally).sort((x, y) => {
        const i = order.indexOf(x[0]);
        const j = order.indexOf(y[0]);
        return (i < 0 ? order.length : i) - (j < 0 ? order.length : j);
      });
    } else if (counts) {
      parts = [
        [counts.met, 'met or avoided'],
        [counts.violated, 'not met or occurred'],
        [counts.missed, 'missed'],
        [counts.pending, 'pending'],
        [counts.awaiting, 'awaiting a rating'],
        [counts.not_applicable, 'do not apply'],
      ].map(([n, word]) => [word, n]);
    } else return '';
    const shown = parts.filter(([, n]) => n > 0).map(([word, n]) => `${n} ${n > 1 && word === 'does not apply' ? 'do not apply' : word}`);
    return shown.length ? shown.join(' · ') : 'no criteria';
  }

  /**
   * A target's outcome and score in one sentence that says how much is decided: the server's
   * `headline`, else the same sentence made from its counts (decided = met + violated + missed;
   * undecided = pending + awaiting). A score is always "of N decided", and while a critical
   * criterion is undecided that comes first, so the sentence never reads as a pass.
   */
  function headlineText(summary, criteria) {
    if (summary.headline) return summary.headline;
    const c = summary.counts || {};
    const n = (x) => (typeof x === 'number' ? x : 0);
    const decided = typeof summary.decided === 'number' ? summary.decided : n(c.met) + n(c.violated) + n(c.missed);
    const undecided = typeof summary.undecided === 'number' ? summary.undecided : n(c.pending) + n(c.awaiting);
    const critical = (x) => (x.severity || (S.criteria.get(x.id) || {}).severity) === 'critical';
    const list = criteria || [];
    const open = list.filter((x) => critical(x) && (x.status === 'pending' || x.status === 'awaiting')).length;
    const failed = list.filter((x) => critical(x) && (x.status === 'violated' || x.status === 'missed')).length;
    const criteriaWord = (k) => (k === 1 ? 'criterion' : 'criteria');
    let head;
    switch (summary.outcome) {
      case 'incomplete':
        return 'incomplete: the session ended with no answer, so nothing was judged';
      case 'fail':
        head = failed ? `fail: ${failed} critical ${criteriaWord(failed)} violated or missed` : 'fail';
        break;
      case 'undecided':
        head = open ? `undecided: ${open} critical ${criteriaWord(open)} ${open === 1 ? 'awaits' : 'await'} a rating` : 'undecided: a critical criterion awaits a rating';
        break;
      case 'pass':
        head = open ? `${open} critical ${criteriaWord(open)} not decided yet` : 'pass: every critical criterion decided and met';
        break;
      default:
        head = open ? `in progress: ${open} critical ${criteriaWord(open)} not decided yet` : 'in progress';
    }
    const pct = percent(summary.score);
    let score;
    if (pct && undecided === 0) score = `score ${pct} (all ${decided} applicable criteria decided)`;
    else if (pct) score = `score ${pct} of ${decided} decided, ${undecided} undecided`;
    else if (undecided > 0) score = `no score yet: ${undecided} undecided`;
    else score = 'no score: no criterion applies';
    return `${head} · ${score}`;
  }

  function renderCriteria() {
    const body = $('criteria-body');
    clear(body);
    if (!S.started) {
      body.append(h('p', { class: 'muted' }, 'Waiting for the session…'));
      return;
    }
    const aliases = S.targets.map((t) => t.alias);

    // One summary per target: outcome, score, counts. The per-criterion statuses are used for
    // the words only while they match the counts (a later `ended` may have updated those).
    const listed = (st) => (sameCounts(st.criteria, st.counts) ? st.criteria : null);
    const summaries = h('div', { class: 'target-summaries' });
    for (const alias of aliases) {
      const st = S.statuses.get(alias);
      summaries.append(
        h(
          'section',
          { class: 'target-summary', 'aria-label': `Target ${targetTitle(alias)}` },
          h(
            'p',
            { class: 'target-summary-head' },
            h('strong', { class: 'alias' }, alias),
            S.byAlias.get(alias) && S.byAlias.get(alias).name ? targetNameNodes(alias) : null,
            h('span', { class: 'target-summary-outcome' }, outcomeChip(st && st.outcome)),
          ),
          st ? h('p', { class: 'target-headline' }, headlineText(st, listed(st))) : h('p', { class: 'muted small' }, 'No criterion is decided yet.'),
          st ? h('p', { class: 'muted small' }, countsText(st.counts, listed(st))) : null,
        ),
      );
    }
    body.append(summaries);

    // Criteria (rows) by target (columns).
    const table = h('table', { class: `crit-table cols-${aliases.length}` });
    table.append(
      h('caption', { class: 'visually-hidden' }, 'Status of every criterion for every target'),
      h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Criterion'), aliases.map((a) => h('th', { scope: 'col', class: 'col-target' }, a)))),
    );
    const tbody = h('tbody');
    for (const def of S.criteria.values()) {
      const cells = aliases.map((a) => {
        const st = S.statuses.get(a);
        return st ? st.criteria.find((c) => c.id === def.id) : null;
      });
      const notes = cells.map((c) => (c && c.note) || '');
      const sharedNote = notes.every((n) => n && n === notes[0]) ? notes[0] : null;
      const sev = (cells.find(Boolean) || def).severity || def.severity;
      tbody.append(
        h(
          'tr',
          { class: `sev-${sev}` },
          h(
            'th',
            { scope: 'row', class: 'crit-cell' },
            h('span', { class: 'crit-text' }, def.text),
            h(
              'span',
              { class: 'crit-meta' },
              h('span', { class: `sev sev-${sev}` }, sev),
              ` · ${KIND_WORDS[def.kind] || def.kind}`,
              def.has_patterns ? null : ' · judge or human only',
            ),
            sharedNote ? h('span', { class: 'crit-note muted' }, sharedNote) : null,
          ),
          cells.map((c) => {
            if (!c) return h('td', { class: 'status-cell' }, h('span', { class: 'muted' }, '–'));
            const detail = statusDetail(c);
            return h(
              'td',
              { class: 'status-cell' },
              h('span', { class: `status status-${safeId(c.status)}` }, statusWord(c)),
              detail ? h('span', { class: 'status-detail muted' }, detail) : null,
              c.note && !sharedNote ? h('span', { class: 'status-detail muted' }, c.note) : null,
            );
          }),
        ),
      );
    }
    table.append(tbody);
    body.append(h('div', { class: 'table-wrap' }, table));
  }

  // ------------------------------------------------------------------ ended

  /**
   * `ended`: the summary, names revealed. It comes again (with `changed_at`) whenever a later
   * rating changes an outcome, a score or the counts: the banner is redrawn from the latest one.
   */
  function onEnded(ev) {
    const first = !S.ended;
    S.ended = ev;
    for (const t of ev.targets) {
      const known = S.byAlias.get(t.alias);
      if (known) Object.assign(known, { name: t.name, label: t.label, canned: t.canned });
      const st = S.statuses.get(t.alias);
      // Every field, even one this server leaves out: a headline must not outlive its counts.
      if (st) {
        Object.assign(st, { outcome: t.outcome, score: t.score, counts: t.counts, decided: t.decided, undecided: t.undecided, headline: t.headline });
      }
    }
    const banner = $('ended-banner');
    const list = $('ended-targets');
    clear(list);
    const updated =
      typeof ev.changed_at === 'number' && ev.changed_at !== ev.ended_at ? ` · updated ${formatClock(ev.changed_at)}` : '';
    $('ended-title').textContent = `Session ended · ${plural(ev.turns, 'turn', 'turns')} · ${formatTime(ev.ended_at)}${updated}`;
    for (const t of ev.targets) {
      const st = S.statuses.get(t.alias);
      const criteria = st && sameCounts(st.criteria, t.counts) ? st.criteria : null;
      list.append(
        h(
          'section',
          { class: `ended-target outcome-border-${safeId(t.outcome)}`, 'aria-label': `Target ${t.alias}: ${t.name}` },
          h(
            'p',
            { class: 'ended-name' },
            h('span', { class: 'alias' }, t.alias),
            h('strong', { text: t.name }),
            t.canned ? h('span', { class: 'badge badge-canned' }, 'canned') : null,
            outcomeChip(t.outcome),
            t.label && t.label !== t.name ? h('span', { class: 'muted small' }, t.label) : null,
          ),
          // How much is decided first; the counts follow in the same paragraph (fewer lines).
          h('p', { class: 'ended-headline' }, headlineText(t, criteria), h('span', { class: 'muted' }, ` (${countsText(t.counts, criteria)})`)),
        ),
      );
    }
    banner.hidden = false;
    renderSessionHead();
    renderCriteria();
    for (const turn of S.turns.values()) {
      renderTurnHead(turn); // markers can no longer be removed
      for (const answer of turn.answers.values()) renderAnswer(answer);
    }
    renderOffered();
    renderMarkers();
    hideEndConfirm();
    // A draft can no longer be sent: keep it on screen, but do not bring it back on reload.
    try {
      sessionStorage.removeItem(draftKey());
    } catch (err) {
      /* nothing stored */
    }
    if (S.replayDone) announce(first ? 'The session has ended. Target names are revealed.' : 'The session’s outcome was updated.');
  }

  /** Whether per-criterion statuses still add up to these counts (else they are older). */
  function sameCounts(criteria, counts) {
    if (!criteria || !counts) return false;
    const tally = { met: 0, violated: 0, missed: 0, pending: 0, awaiting: 0, not_applicable: 0 };
    for (const c of criteria) tally[c.status === 'n/a' ? 'not_applicable' : c.status] += 1;
    return Object.keys(tally).every((key) => (counts[key] || 0) === tally[key]);
  }

  // ------------------------------------------------------------------ controls

  const textarea = $('say');

  function isStreaming() {
    if (S.ended || !S.started) return false;
    const turn = S.turns.get(S.lastTurn);
    if (!turn || !turn.text) return false;
    return S.targets.some((t) => {
      const a = turn.answers.get(t.alias);
      return !(a && a.final);
    });
  }

  function renderOffered() {
    const box = $('offered');
    const scripted = S.started && S.started.mode === 'scripted';
    const line = S.offered;
    box.hidden = !scripted || !line || !!S.ended;
    $('script-done').hidden = !(scripted && line === null && !S.ended && S.lastTurn > 0);
    if (!line) return;
    $('offered-text').textContent = line.text;
    const notes = [`line ${line.index + 1} of ${S.started.scenario.script_lines}`];
    if (line.branch === 'otherwise') notes.push('the replacement line: its condition was not met for every target');
    if (line.marks) notes.push(`sending it sets the marker “${line.marks}”`);
    $('offered-note').textContent = `· ${notes.join(' · ')}`;
  }

  function renderMarkers() {
    const box = $('markers');
    const buttons = $('markers-buttons');
    const markers = (S.started && S.started.markers) || [];
    box.hidden = markers.length === 0 || !!S.ended;
    clear(buttons);
    for (const m of markers) {
      const turns = Array.from(S.turns.values()).filter((t) => t.markers.has(m.id)).map((t) => t.turn);
      const button = h(
        'button',
        { type: 'button', class: 'button small marker-button', title: m.text, 'data-marker': m.id, 'aria-describedby': `marker-desc-${safeId(m.id)}` },
        m.id,
        turns.length ? h('span', { class: 'muted' }, ` (turn ${turns.join(', ')})`) : null,
      );
      button.addEventListener('click', () => mark(m.id, button));
      buttons.append(button, h('span', { class: 'visually-hidden', id: `marker-desc-${safeId(m.id)}` }, m.text));
    }
    updateControls();
  }

  function mark(marker, button) {
    button.disabled = true;
    command(
      { type: 'mark', marker },
      {
        onAck: () => updateControls(),
        onError: (_ev, words) => {
          updateControls();
          showInline($('composer-error'), `Could not set the marker: ${words}`);
        },
      },
    );
  }

  function updateControls() {
    if (!S.started) {
      // Nothing can be sent before the session is known.
      for (const id of ['send', 'stop', 'end', 'send-offered', 'edit-offered']) $(id).disabled = true;
      $('end').hidden = true; // nothing to end yet (or the session was not found)
      return;
    }
    const ended = !!S.ended;
    const streaming = isStreaming();
    const sending = pending('say') || pending('next');
    const online = Conn.attached;
    const ready = online && !ended && !streaming && !sending;

    textarea.disabled = ended;
    textarea.readOnly = sending;
    // After the end, the composer only stays (disabled) if it still holds text.
    $('composer').classList.toggle('is-ended', ended);
    $('composer').classList.toggle('has-text', !!textarea.value);
    $('ended-note').hidden = !ended;
    $('send').disabled = !ready;
    $('send-offered').disabled = !ready;
    $('edit-offered').disabled = ended;
    const stop = $('stop');
    stop.hidden = !streaming;
    stop.disabled = !online || pending('stop');
    stop.textContent = pending('stop') ? 'Stopping…' : 'Stop answers';
    $('end').disabled = ended || !online || pending('end');
    $('end').hidden = ended;
    for (const b of document.querySelectorAll('.marker-button')) b.disabled = ended || !online || S.lastTurn === 0 || pending('mark');
    // Which turn a marker button marks, by number (shorter than "the latest turn", and exact).
    const markLabel = S.lastTurn ? `Mark turn ${S.lastTurn}:` : 'Mark the latest turn:';
    if ($('markers-label').textContent !== markLabel) $('markers-label').textContent = markLabel;
    // "Ask again" follows whether anything streams and which turn is the latest.
    for (const turn of S.turns.values()) for (const answer of turn.answers.values()) renderAskAgain(answer);

    const error = $('composer-error');
    if (ready && error.dataset.kind === 'streaming') {
      error.hidden = true;
      error.dataset.kind = '';
    }

    let why = '';
    if (ended) why = 'The session has ended, so this text can no longer be sent.';
    else if (!online && S.notFound) why = '';
    else if (!online) why = 'Connection lost: reconnecting… Your text is kept here.';
    else if (sending) why = 'Sending…';
    else if (streaming) why = 'The answers are coming in. You can draft your next line; it can be sent when they finish, or press Stop to cut them short.';
    else if (S.started.mode === 'scripted' && S.offered) why = 'A line you type here is sent in place of the offered script line.';
    const status = $('composer-status');
    if (status.textContent !== why) status.textContent = why;
    $('composer').classList.toggle('is-busy', streaming || sending);
  }

  // --- drafts survive reloads (per tab)

  const draftKey = () => `vigil.draft.${S.sessionId}`;

  function saveDraft() {
    if (!S.sessionId) return;
    try {
      if (textarea.value) sessionStorage.setItem(draftKey(), textarea.value);
      else sessionStorage.removeItem(draftKey());
    } catch (err) {
      /* storage may be unavailable; the text stays in the box */
    }
  }

  function restoreDraft() {
    if (textarea.value) return;
    try {
      const draft = sessionStorage.getItem(draftKey());
      if (draft) textarea.value = draft;
      fitTextarea();
      checkLineLength();
    } catch (err) {
      /* nothing to restore */
    }
  }

  /** The box grows with its text (up to the CSS max-height), so a long line stays readable. */
  function fitTextarea() {
    textarea.style.height = 'auto';
    if (textarea.value) textarea.style.height = `${textarea.scrollHeight + 2}px`;
    else textarea.style.height = '';
  }

  /**
   * Says next to the composer when the line is longer than the server accepts (counted as the
   * server does: trimmed, in characters), and clears that once it fits. True when too long.
   */
  function checkLineLength() {
    const error = $('composer-error');
    const limit = maxTextChars();
    // A string is never fewer UTF-16 units than characters: short ones need no counting.
    const chars = textarea.value.length > limit ? charCount(textarea.value.trim()) : 0;
    if (chars > limit) {
      showInline(error, `This line has ${count(chars)} characters; the limit is ${count(limit)}. Shorten it to send it.`);
      error.dataset.kind = 'too-long';
      return true;
    }
    if (error.dataset.kind === 'too-long') {
      error.hidden = true;
      error.dataset.kind = '';
    }
    return false;
  }

  textarea.addEventListener('input', () => {
    $('composer-error').hidden = true;
    $('composer-error').dataset.kind = '';
    checkLineLength();
    if (!S.ended) saveDraft();
    fitTextarea();
  });

  textarea.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.altKey && !e.ctrlKey && !e.metaKey && !e.isComposing) {
      e.preventDefault();
      say();
    }
  });

  $('composer').addEventListener('submit', (e) => {
    e.preventDefault();
    say();
  });

  function say() {
    const text = textarea.value;
    const error = $('composer-error');
    if ($('send').disabled) {
      if (isStreaming()) {
        showInline(error, 'The answers are still coming in. Wait for them to finish, or press Stop.');
        error.dataset.kind = 'streaming';
      }
      return;
    }
    if (!text.trim()) {
      showInline(error, 'Type a line first.');
      return;
    }
    if (checkLineLength()) return;
    error.hidden = true;
    error.dataset.kind = '';
    S.justSent = true;
    command(
      { type: 'say', text },
      {
        onAck: () => {
          // Clear only now that the server has it, and only if it is still what was sent.
          if (textarea.value === text) textarea.value = '';
          saveDraft();
          fitTextarea();
          updateControls();
          textarea.focus();
        },
        onError: (_ev, words) => {
          S.justSent = false;
          showInline(error, `Not sent: ${words} Your text is still here.`);
          updateControls();
        },
      },
    );
  }

  $('send-offered').addEventListener('click', () => {
    $('composer-error').hidden = true;
    S.justSent = true;
    command(
      { type: 'next' },
      {
        onError: (_ev, words) => {
          S.justSent = false;
          showInline($('composer-error'), `The script line was not sent: ${words}`);
        },
      },
    );
  });

  $('edit-offered').addEventListener('click', () => {
    if (!S.offered) return;
    const before = textarea.value;
    textarea.value = S.offered.text;
    saveDraft();
    fitTextarea();
    textarea.focus();
    textarea.setSelectionRange(textarea.value.length, textarea.value.length);
    if (before.trim() && before !== S.offered.text) {
      toast('The script line replaced what you had typed.', {
        kind: 'info',
        timeout: 15000,
        actions: [['Undo', () => { textarea.value = before; saveDraft(); fitTextarea(); textarea.focus(); }]],
      });
    }
  });

  $('stop').addEventListener('click', () => {
    command(
      { type: 'stop' },
      {
        onAck: () => updateControls(),
        onError: (_ev, words) => showInline($('composer-error'), `Could not stop: ${words}`),
      },
    );
  });

  function hideEndConfirm() {
    $('end-confirm').hidden = true;
  }

  $('end').addEventListener('click', () => {
    $('end-error').hidden = true;
    $('end-confirm').hidden = false;
    $('end-no').focus();
  });
  $('end-no').addEventListener('click', () => {
    hideEndConfirm();
    $('end').focus();
  });
  $('end-confirm').addEventListener('keydown', (e) => {
    if (e.key === 'Escape') {
      hideEndConfirm();
      $('end').focus();
    }
  });
  $('end-yes').addEventListener('click', () => {
    $('end-yes').disabled = true;
    command(
      { type: 'end' },
      {
        onAck: () => {
          $('end-yes').disabled = false;
          hideEndConfirm();
        },
        onError: (_ev, words) => {
          $('end-yes').disabled = false;
          showInline($('end-error'), `The session was not ended: ${words}`);
        },
      },
    );
  });

  // ------------------------------------------------------------------ scrolling

  function scroller() {
    const t = $('transcript');
    return getComputedStyle(t).overflowY === 'auto' ? t : document.scrollingElement;
  }

  function isAtBottom() {
    const s = scroller();
    return s.scrollHeight - s.scrollTop - s.clientHeight < 64;
  }

  function scrollToBottom(instant) {
    const s = scroller();
    s.scrollTo({ top: s.scrollHeight, behavior: instant || reduceMotion.matches ? 'auto' : 'smooth' });
  }

  // ------------------------------------------------------------------ start form

  const startForm = $('start-form');
  let blindTouched = false;
  let pendingStart = null;

  function selectedScenario() {
    const input = scenarioInputs.find((i) => i.checked);
    return input ? SCENARIOS.get(input.value) : null;
  }

  function selectedTargets() {
    return targetInputs.filter((i) => i.checked && !i.disabled).map((i) => i.value);
  }

  function syncStartForm() {
    const scenario = selectedScenario();
    const scripted = $('mode-scripted');
    const noScript = !!scenario && scenario.lines === 0;
    scripted.disabled = noScript;
    $('mode-scripted-why').hidden = !noScript;
    if (noScript && scripted.checked) startForm.querySelector('input[name="mode"][value="free"]').checked = true;
    if (!blindTouched) $('start-blind').checked = selectedTargets().length > 1;
  }

  for (const input of [...scenarioInputs, ...targetInputs]) input.addEventListener('change', syncStartForm);
  $('start-blind').addEventListener('change', () => {
    blindTouched = true;
  });

  // With one available target, choose it.
  {
    const available = targetInputs.filter((i) => !i.disabled);
    if (available.length === 1) available[0].checked = true;
  }
  syncStartForm();

  startForm.addEventListener('submit', (e) => {
    e.preventDefault();
    const scenario = selectedScenario();
    const targets = selectedTargets();
    const problems = [];
    if (!scenario) problems.push('Choose a scenario.');
    if (!targets.length) problems.push('Choose at least one target.');
    const error = $('start-error');
    if (problems.length) {
      showInline(error, problems.join(' '));
      (scenario ? targetInputs.find((i) => !i.disabled) : scenarioInputs[0])?.focus();
      return;
    }
    error.hidden = true;
    const mode = startForm.querySelector('input[name="mode"]:checked').value;
    const label = $('start-label').value.trim();
    const blind = $('start-blind').checked;
    pendingStart = { scenario, targets, mode, label, blind };

    $('warn-text').textContent = scenario.warning || 'This scenario has no content warning; it still portrays a person in crisis.';
    const summary = $('warn-summary');
    clear(summary);
    const row = (term, ...value) => [h('dt', {}, term), h('dd', {}, ...value)];
    append(summary, [
      row('Scenario', scenario.title, ' ', h('span', { class: `tag risk risk-${scenario.risk}` }, `risk: ${scenario.risk}`), ' ', h('span', { class: 'tag' }, scenario.locale)),
      row(
        targets.length > 1 ? 'Targets' : 'Target',
        targets.map((name, i) => [i ? ', ' : '', name, TARGETS.get(name)?.canned ? [' ', h('span', { class: 'badge badge-canned' }, 'canned')] : null]),
      ),
      row('Mode', mode === 'scripted' ? `scripted (${plural(scenario.lines, 'line', 'lines')})` : 'free'),
      row('Blind', blind ? 'yes: names hidden and order shuffled until the end' : 'no'),
      label ? row('Label', label) : null,
    ]);
    renderWarnAbout(scenario);
    startForm.hidden = true;
    $('recent').hidden = true;
    $('warning-step').hidden = false;
    $('begin-error').hidden = true;
    $('begin').disabled = false;
    $('begin').textContent = 'I’m ready, begin';
    $('warning-title').focus();
  });

  $('back').addEventListener('click', () => {
    if (pending('start')) return;
    $('warning-step').hidden = true;
    startForm.hidden = false;
    $('recent').hidden = false;
    startForm.querySelector('button[type="submit"]').focus();
  });

  $('begin').addEventListener('click', () => {
    if (!pendingStart || pending('start')) return;
    const { scenario, targets, mode, label, blind } = pendingStart;
    const begin = $('begin');
    begin.disabled = true;
    begin.textContent = 'Starting…';
    $('back').disabled = true;
    const msg = { type: 'start', scenario: scenario.id, targets, mode, blind };
    if (label) msg.label = label;
    command(msg, {
      onAck: () => {
        $('back').disabled = false;
        $('s-title').focus();
      },
      onError: (_ev, words) => {
        begin.disabled = false;
        begin.textContent = 'I’m ready, begin';
        $('back').disabled = false;
        showInline($('begin-error'), `The session did not start: ${words}`);
      },
    });
    if (!Conn.ws) connect();
  });

  // ------------------------------------------------------------------ recent sessions

  const recent = { page: 1, perPage: 10, status: '' };

  async function loadRecent() {
    const body = $('recent-body');
    body.setAttribute('aria-busy', 'true');
    const params = new URLSearchParams({ page: String(recent.page), per_page: String(recent.perPage) });
    if (recent.status) params.set('status', recent.status);
    try {
      const response = await fetch(`/api/sessions?${params}`, { headers: { Accept: 'application/json' } });
      const data = await response.json().catch(() => null);
      if (!response.ok) throw new Error((data && data.message) || `the server answered ${response.status}`);
      renderRecent(data);
    } catch (err) {
      clear(body);
      body.append(
        h(
          'p',
          { class: 'form-error' },
          `The recent sessions could not be loaded: ${err.message}. `,
          h('button', { type: 'button', class: 'button small', onclick: loadRecent }, 'Try again'),
        ),
      );
      $('recent-pager').hidden = true;
    } finally {
      body.removeAttribute('aria-busy');
    }
  }

  function recentTargets(item) {
    return item.targets.map((t) => {
      const known = t.name ? TARGETS.get(t.name) : null;
      return h(
        'li',
        {},
        h('span', { class: 'alias' }, t.alias),
        ' ',
        t.name ? t.name : h('span', { class: 'muted' }, 'hidden'),
        known && known.canned ? [' ', h('span', { class: 'badge badge-canned' }, 'canned')] : null,
        ' ',
        t.outcome || item.status !== 'ended' ? outcomeChip(t.outcome || 'in_progress') : h('span', { class: 'muted' }, 'no outcome'),
        // A bare percentage reads as a pass: say it is of the decided criteria only.
        percent(t.score)
          ? h('span', { class: 'muted', title: t.headline || null }, typeof t.decided === 'number' ? ` score ${percent(t.score)} of ${t.decided} decided` : ` score ${percent(t.score)} of those decided`)
          : null,
      );
    });
  }

  function renderRecent(data) {
    const body = $('recent-body');
    clear(body);
    if (!data.items.length) {
      body.append(h('p', { class: 'muted' }, recent.status ? 'No sessions match this filter.' : 'No sessions yet. The ones you start will be listed here.'));
      $('recent-pager').hidden = data.page <= 1;
    } else {
      const rows = data.items.map((item) => {
        const scenario = SCENARIOS.get(item.scenario_id);
        const href = `/sessions/${encodeURIComponent(item.id)}`;
        const title = scenario ? scenario.title : item.scenario_id;
        const verb = item.status === 'ended' ? 'Review' : 'Open';
        return h(
          'tr',
          {},
          h(
            'td',
            {},
            h('a', { href, class: 'recent-title' }, title),
            item.label ? h('span', { class: 'block recent-label' }, item.label) : null,
            h('span', { class: 'muted small block' }, [item.mode, item.blind ? 'blind' : null, plural(item.turns, 'turn', 'turns')].filter(Boolean).join(' · ')),
          ),
          h('td', {}, h('span', { class: 'tag state-tag', 'data-state': item.status }, item.status)),
          h('td', {}, h('ul', { class: 'plain' }, recentTargets(item))),
          h('td', { class: 'small' }, formatTime(item.created_at)),
          h(
            'td',
            {},
            h('a', { href, class: 'button small', 'aria-label': `${verb}: ${title}${item.label ? `, ${item.label}` : ''}, ${formatTime(item.created_at)}` }, verb),
          ),
        );
      });
      body.append(
        h(
          'div',
          { class: 'table-wrap' },
          h(
            'table',
            { class: 'recent-table' },
            h('caption', { class: 'visually-hidden' }, 'Recent sessions, newest first'),
            h(
              'thead',
              {},
              h('tr', {}, ['Scenario and label', 'Status', 'Targets and outcomes', 'Started', ''].map((t) => h('th', { scope: 'col' }, t || h('span', { class: 'visually-hidden' }, 'Open')))),
            ),
            h('tbody', {}, rows),
          ),
        ),
      );
    }
    const pages = Math.max(1, Math.ceil(data.total / data.per_page));
    $('recent-pager').hidden = pages <= 1 && data.page <= 1;
    $('recent-page').textContent = `Page ${data.page} of ${pages} · ${plural(data.total, 'session', 'sessions')}`;
    $('recent-prev').disabled = data.page <= 1;
    $('recent-next').disabled = data.page >= pages;
  }

  $('recent-prev').addEventListener('click', () => {
    recent.page = Math.max(1, recent.page - 1);
    loadRecent();
  });
  $('recent-next').addEventListener('click', () => {
    recent.page += 1;
    loadRecent();
  });
  $('recent-status').addEventListener('change', (e) => {
    recent.status = e.target.value;
    recent.page = 1;
    loadRecent();
  });
  $('recent-refresh').addEventListener('click', loadRecent);

  // ------------------------------------------------------------------ go

  window.addEventListener('beforeunload', (e) => {
    // Only warn when something would really be lost: a line not yet acknowledged.
    if (outbox.some((entry) => entry.msg.type === 'say' || entry.msg.type === 'rate')) {
      e.preventDefault();
      e.returnValue = '';
    }
  });

  if (S.sessionId) {
    showSessionView();
    updateControls();
    connect();
  } else {
    loadRecent();
  }

  // For debugging in the console only. `inject` hands the page an event as if the server had sent
  // it (to try events a server does not send yet); it changes nothing on the server.
  window.vigil = { state: S, conn: Conn, outbox, inject: (ev) => onEvent(ev) };
})();
