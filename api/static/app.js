/* Overlord Agent chat page.
 *
 * Plain ES2020, no modules, no dependencies. Talks to the same-origin API under /agent
 * with the browser's session cookie (credentials: "same-origin").
 *
 * Safety rule for this file: user and model text only ever reaches the DOM through
 * textContent / dataset / title, never through innerHTML.
 */
"use strict";

(() => {
  const API = "/agent";
  const SESSION_KEY = "overlord.agent.session_id";
  const JOB_KEY = "overlord.agent.job_id";
  // The text of the in-flight question, so a reload can show it again while its answer is
  // still pending (the transcript may not contain it yet).
  const PENDING_KEY = "overlord.agent.pending_message";

  const POLL_WAIT_S = 20; // long-poll length; the server caps it at 25
  const POLL_MIN_SPACING_MS = 1000; // never poll faster than this, even if the server answers early
  const BACKOFF_START_MS = 1000;
  const BACKOFF_MAX_MS = 15000;
  const REQUEST_TIMEOUT_MS = 30000;
  const SOFT_MAX_LEN = 10000; // the original service's limit; the server has the final word (422)

  const TERMINAL = new Set(["finished", "failed", "canceled", "expired"]);

  const TEXT = {
    signedOut: "You are signed out. Sign in to dereth-tracker and reload.",
    expired: "Your question waited too long in the queue and expired; please ask again",
    gone: "This job is no longer available",
    retrying: "Connection problem, retrying…",
    canceled: "Canceled",
    busySession: "This conversation is still answering a previous question",
    concurrency: "Another question is still being answered",
    demo: "Demo mode: replies are not from a real model",
  };

  const state = {
    sessionId: null,
    watch: null, // {jobId, ctrl, canceling, since} while a job is being followed
    sending: false, // POST /ask in progress
    switching: false, // "New conversation" in progress
    signedOut: false,
    ready: Promise.resolve(),
    elapsedTimer: null,
  };

  let els = null;

  /* ------------------------------------------------------------------ storage */

  const store = {
    get(key) {
      try {
        const v = window.localStorage.getItem(key);
        return v === null || v === "" ? null : v;
      } catch (_) {
        return null;
      }
    },
    set(key, value) {
      try {
        if (value === null || value === undefined) window.localStorage.removeItem(key);
        else window.localStorage.setItem(key, String(value));
      } catch (_) {
        /* private mode or quota: the page still works, it just forgets on reload */
      }
    },
  };

  /* ------------------------------------------------------------------ helpers */

  function sleep(ms, signal) {
    // Resolves after ms, or early when the signal aborts or the browser comes back online.
    return new Promise((resolve) => {
      let done = false;
      let timer = null;
      const finish = () => {
        if (done) return;
        done = true;
        if (timer !== null) clearTimeout(timer);
        window.removeEventListener("online", finish);
        if (signal) signal.removeEventListener("abort", finish);
        resolve();
      };
      timer = setTimeout(finish, ms);
      window.addEventListener("online", finish);
      if (signal) {
        if (signal.aborted) finish();
        else signal.addEventListener("abort", finish);
      }
    });
  }

  function parseRetryAfter(value) {
    if (!value) return null;
    const trimmed = String(value).trim();
    if (/^\d+(\.\d+)?$/.test(trimmed)) return Math.max(0, Math.ceil(Number(trimmed)));
    const when = Date.parse(trimmed);
    if (!Number.isNaN(when)) return Math.max(0, Math.ceil((when - Date.now()) / 1000));
    return null;
  }

  function plural(n, word) {
    return `${n} ${word}${n === 1 ? "" : "s"}`;
  }

  function humanWait(seconds) {
    if (seconds < 60) return plural(Math.max(1, seconds), "second");
    return plural(Math.ceil(seconds / 60), "minute");
  }

  function parseTime(value) {
    if (value === null || value === undefined || value === "") return null;
    let d;
    if (typeof value === "number") d = new Date(value > 1e12 ? value : value * 1000);
    else if (value instanceof Date) d = value;
    else d = new Date(String(value));
    return Number.isNaN(d.getTime()) ? null : d;
  }

  function formatTime(d) {
    const now = new Date();
    const sameDay = d.toDateString() === now.toDateString();
    try {
      return sameDay
        ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
        : d.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
    } catch (_) {
      return d.toISOString();
    }
  }

  function detailText(data) {
    if (!data || typeof data !== "object") return null;
    const d = data.detail;
    if (typeof d === "string" && d.trim()) return d.trim();
    if (Array.isArray(d)) {
      // FastAPI's own validation errors: [{loc, msg, type}, ...]
      const parts = d
        .map((item) => (item && typeof item === "object" ? item.msg : item))
        .filter((m) => typeof m === "string" && m);
      if (parts.length) return parts.join("; ");
    }
    return null;
  }

  function jobUrl(jobId) {
    return `${API}/jobs/${encodeURIComponent(jobId)}`;
  }

  /* ------------------------------------------------------------------ HTTP */

  // Never throws. Returns {ok, status, data, retryAfter} or {networkError: true} or {aborted: true}.
  async function api(method, path, opts = {}) {
    const ctrl = new AbortController();
    const outer = opts.signal || null;
    const onOuterAbort = () => ctrl.abort();
    if (outer) {
      if (outer.aborted) return { aborted: true, status: 0 };
      outer.addEventListener("abort", onOuterAbort);
    }
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      ctrl.abort();
    }, opts.timeoutMs || REQUEST_TIMEOUT_MS);

    const init = {
      method,
      credentials: "same-origin",
      cache: "no-store",
      headers: { Accept: "application/json" },
      signal: ctrl.signal,
    };
    if (opts.body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(opts.body);
    }

    try {
      const res = await fetch(path, init);
      const raw = await res.text();
      let data = null;
      if (raw) {
        try {
          data = JSON.parse(raw);
        } catch (_) {
          data = null; // e.g. an HTML error page from a proxy
        }
      }
      return {
        ok: res.ok,
        status: res.status,
        data,
        retryAfter: parseRetryAfter(res.headers.get("Retry-After")),
      };
    } catch (_) {
      if (outer && outer.aborted) return { aborted: true, status: 0 };
      return { networkError: true, timedOut, status: 0, data: null, retryAfter: null };
    } finally {
      clearTimeout(timer);
      if (outer) outer.removeEventListener("abort", onOuterAbort);
    }
  }

  function isRetryable(res) {
    return !!res.networkError || res.status >= 500;
  }

  // Retries network errors and 5xx with exponential backoff (Retry-After honoured, capped).
  async function withRetry(request) {
    let backoff = BACKOFF_START_MS;
    for (;;) {
      const res = await request();
      if (!isRetryable(res)) return res;
      if (res.status === 503) setStatus(describeError(res), "warn");
      else setStatus(TEXT.retrying, "warn");
      let delay = backoff;
      if (res.retryAfter) delay = Math.min(Math.max(res.retryAfter * 1000, BACKOFF_START_MS), 60000);
      await sleep(delay);
      backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
    }
  }

  function describeError(res) {
    if (!res || res.networkError) return "Connection problem; check your network and try again.";
    const data = res.data && typeof res.data === "object" ? res.data : {};
    const code = data.code;
    const detail = detailText(data);
    switch (res.status) {
      case 401:
        return TEXT.signedOut;
      case 403:
        return detail
          ? `The request was refused: ${detail}. Reload this page from the agent's own address.`
          : "The request was refused (it did not come from this page's own address). Reload the page.";
      case 404:
        return detail || "Not found.";
      case 409:
        return TEXT.busySession;
      case 422:
        return detail || "That message can't be sent: the input is not valid.";
      case 429:
        if (code === "concurrency_limited" || (code !== "rate_limited" && data.job_id && !res.retryAfter)) {
          return TEXT.concurrency;
        }
        return res.retryAfter !== null && res.retryAfter !== undefined
          ? `You've reached the limit of questions per hour; try again in ${humanWait(res.retryAfter)}`
          : "You've reached the limit of questions per hour; try again later";
      case 503:
        return res.retryAfter !== null && res.retryAfter !== undefined
          ? `The service is busy or unavailable; try again in ${Math.max(1, res.retryAfter)} s`
          : "The service is busy or unavailable; try again in a few seconds";
      default:
        if (res.status >= 500) return `The server had a problem (HTTP ${res.status}); please try again.`;
        return detail || `Unexpected answer from the server (HTTP ${res.status}).`;
    }
  }

  /* ------------------------------------------------------------------ view */

  function setStatus(text, kind = "info") {
    els.status.textContent = text || "";
    els.status.dataset.kind = kind;
  }

  function isTransientStatus() {
    const t = els.status.textContent;
    return t === "" || t === "Loading…" || t === TEXT.retrying || t.startsWith("The service is busy");
  }

  function updateControls() {
    const inFlight = !!state.watch || state.sending;
    els.send.disabled = inFlight || state.signedOut || state.switching;
    els.cancel.hidden = !state.watch;
    els.cancel.disabled = !state.watch || state.watch.canceling;
    els.newSession.disabled = state.signedOut || state.switching || state.sending;
    els.message.disabled = state.signedOut;
    els.spinner.hidden = !inFlight && !state.switching;
    els.typing.hidden = !state.watch;
    els.messages.setAttribute("aria-busy", state.switching ? "true" : "false");
  }

  function updateEmptyHint() {
    els.emptyHint.hidden = state.signedOut || els.messages.childElementCount > 0;
  }

  function isNearBottom() {
    const c = els.conversation;
    return c.scrollHeight - c.scrollTop - c.clientHeight < 120;
  }

  function scrollToBottom() {
    els.conversation.scrollTop = els.conversation.scrollHeight;
  }

  // Show the start of a (possibly long) answer rather than its end.
  function revealStartOf(el) {
    const c = els.conversation;
    const top = el.offsetTop - 12;
    if (el.offsetHeight > c.clientHeight * 0.8) c.scrollTop = top;
    else scrollToBottom();
  }

  function appendMessage(role, text, timestamp, opts = {}) {
    const wasNearBottom = isNearBottom();
    const kind = role === "user" || role === "error" ? role : "assistant";
    const el = document.createElement("div");
    el.className = `msg ${kind}`;
    el.textContent = typeof text === "string" ? text : String(text ?? "");
    const when = parseTime(timestamp);
    if (when) {
      el.dataset.meta = formatTime(when);
      el.title = when.toLocaleString();
    }
    els.messages.appendChild(el);
    updateEmptyHint();
    if (opts.scroll !== false) {
      if (opts.force) scrollToBottom();
      else if (wasNearBottom) revealStartOf(el);
    }
    return el;
  }

  function markUnsent(el) {
    if (!el) return;
    el.classList.add("unsent");
    el.dataset.meta = el.dataset.meta ? `Not sent · ${el.dataset.meta}` : "Not sent";
  }

  function clearMessages() {
    els.messages.replaceChildren();
    updateEmptyHint();
  }

  function renderHistory(messages) {
    els.messages.setAttribute("aria-busy", "true");
    clearMessages();
    for (const m of messages) {
      if (!m || typeof m !== "object") continue;
      const text = typeof m.text === "string" ? m.text : "";
      if (!text) continue;
      appendMessage(m.role === "user" ? "user" : "assistant", text, m.timestamp, { scroll: false });
    }
    els.messages.setAttribute("aria-busy", "false");
    scrollToBottom();
  }

  function lastUserText() {
    const users = els.messages.querySelectorAll(".msg.user");
    return users.length ? users[users.length - 1].textContent : null;
  }

  function autoResize() {
    const ta = els.message;
    ta.style.height = "auto";
    const max = Math.max(120, Math.round(window.innerHeight * 0.4));
    ta.style.height = `${Math.min(ta.scrollHeight + 2, max)}px`;
    ta.style.overflowY = ta.scrollHeight + 2 > max ? "auto" : "hidden";
  }

  function updateCounter() {
    const n = els.message.value.length;
    if (n > SOFT_MAX_LEN * 0.8) {
      els.charCount.textContent = `${n.toLocaleString()} / ${SOFT_MAX_LEN.toLocaleString()} characters`;
      els.charCount.dataset.over = n > SOFT_MAX_LEN ? "true" : "false";
    } else {
      els.charCount.textContent = "";
      els.charCount.dataset.over = "false";
    }
  }

  function setMessageText(text) {
    els.message.value = text;
    autoResize();
    updateCounter();
  }

  function showUser(user) {
    let name = null;
    if (typeof user === "string") name = user;
    else if (user && typeof user === "object") {
      name = user.display_name || user.name || user.username || user.email || user.id || null;
    }
    els.userLabel.hidden = false;
    els.user.textContent = name ? String(name) : "unknown user";
  }

  function startElapsed(w) {
    stopElapsed();
    const tick = () => {
      if (state.watch !== w) return;
      const s = Math.max(0, Math.floor((Date.now() - w.since) / 1000));
      els.elapsed.textContent = `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
    };
    tick();
    state.elapsedTimer = setInterval(tick, 1000);
  }

  function stopElapsed() {
    if (state.elapsedTimer !== null) clearInterval(state.elapsedTimer);
    state.elapsedTimer = null;
    els.elapsed.textContent = "";
  }

  function setSignedOut() {
    state.signedOut = true;
    if (state.watch) endWatch(state.watch, { keepJob: true });
    els.userLabel.hidden = true;
    els.user.textContent = "Not signed in";
    setStatus(TEXT.signedOut, "error");
    updateControls();
    updateEmptyHint();
  }

  /* ------------------------------------------------------------------ health */

  async function checkHealth() {
    const res = await api("GET", `${API}/health`, { timeoutMs: 10000 });
    if (!res.ok || !res.data || typeof res.data !== "object") return;
    const h = res.data;
    els.demoBanner.hidden = h.demo !== true;
    let note = "";
    if (h.redis === false || (typeof h.redis === "string" && h.redis !== "ok")) {
      note = "The service reports a problem with its queue; questions may fail for a while.";
    } else if (h.workers === 0) {
      note = "No workers are running right now; questions will wait in the queue until one starts.";
    }
    els.serviceNote.textContent = note;
    els.serviceNote.hidden = !note;
  }

  /* ------------------------------------------------------------------ sessions */

  function setSession(id) {
    state.sessionId = id;
    store.set(SESSION_KEY, id);
  }

  async function createSession() {
    const res = await withRetry(() => api("POST", `${API}/sessions/new`));
    if (res.ok && res.data && typeof res.data.session_id === "string" && res.data.session_id) {
      setSession(res.data.session_id);
      return res.data.session_id;
    }
    if (res.status === 401) setSignedOut();
    else setStatus(`Couldn't start a conversation: ${describeError(res)}`, "error");
    return null;
  }

  // Loads and renders the current session's history. Starts a new session if it is gone.
  async function loadHistory() {
    const sid = state.sessionId;
    const res = await withRetry(() =>
      api("GET", `${API}/sessions/${encodeURIComponent(sid)}/history`)
    );
    if (state.sessionId !== sid) return false;
    if (res.ok) {
      const msgs = res.data && Array.isArray(res.data.messages) ? res.data.messages : [];
      renderHistory(msgs);
      return true;
    }
    if (res.status === 401) {
      setSignedOut();
      return false;
    }
    if (res.status === 404 || res.status === 400 || res.status === 422) {
      // Not ours any more (or never was): its in-flight job, if any, goes with it.
      store.set(JOB_KEY, null);
      store.set(PENDING_KEY, null);
      clearMessages();
      const id = await createSession();
      if (id) setStatus("The previous conversation is no longer available, so a new one was started.");
      return !!id;
    }
    setStatus(`Couldn't load this conversation: ${describeError(res)}`, "error");
    return false;
  }

  /* ------------------------------------------------------------------ jobs */

  function jobStatusText(job) {
    if (job.status === "queued") {
      const p = job.position;
      return typeof p === "number" && p >= 0 ? `Queued (position ${p + 1})` : "Queued";
    }
    if (job.status === "started") {
      const pr = job.progress && typeof job.progress === "object" ? job.progress : {};
      const parts = [];
      if (typeof pr.turns === "number" && pr.turns > 0) parts.push(`turn ${pr.turns}`);
      if (pr.tool) parts.push(`using ${pr.tool}`);
      return parts.length ? `Working… (${parts.join(", ")})` : "Working…";
    }
    return job.status ? `Waiting (${job.status})…` : "Waiting…";
  }

  function showJobStatus(w, job) {
    const since = parseTime(job.enqueued_at);
    if (since && !w.sinceFromServer) {
      const t = since.getTime();
      if (t <= Date.now() + 5000 && Date.now() - t < 86400000) w.since = Math.min(w.since, t);
      w.sinceFromServer = true;
    }
    if (w.canceling) return;
    setStatus(jobStatusText(job), "info");
  }

  function endWatch(w, opts = {}) {
    if (state.watch !== w) return;
    state.watch = null;
    w.ctrl.abort();
    if (!opts.keepJob) {
      store.set(JOB_KEY, null);
      store.set(PENDING_KEY, null);
    }
    stopElapsed();
    updateControls();
  }

  function finishJob(w, job) {
    if (state.watch !== w) return;
    endWatch(w);
    const mine = !job.session_id || job.session_id === state.sessionId;
    const err = job.error && typeof job.error === "object" ? job.error : {};
    const errMsg = typeof err.message === "string" && err.message.trim() ? err.message.trim() : null;

    switch (job.status) {
      case "finished": {
        const r = job.result && typeof job.result === "object" ? job.result : {};
        const text = typeof r.result === "string" ? r.result : r.result == null ? "" : String(r.result);
        if (!mine) {
          setStatus("A question from an earlier conversation finished.");
          return;
        }
        if (r.is_error) {
          appendMessage("error", text || "The agent reported an error.", job.ended_at || new Date());
          setStatus("The agent reported an error", "error");
          return;
        }
        appendMessage("assistant", text || "(The agent returned an empty reply.)", job.ended_at || new Date());
        const secs = typeof r.duration_ms === "number" ? ` in ${(r.duration_ms / 1000).toFixed(1)} s` : "";
        setStatus(`Answered${secs}`);
        return;
      }
      case "failed": {
        const msg = errMsg || "Something went wrong while answering your question; please ask again.";
        if (mine) appendMessage("error", msg, job.ended_at || new Date());
        setStatus("The question failed", "error");
        return;
      }
      case "expired":
        if (mine) appendMessage("error", TEXT.expired, job.ended_at || new Date());
        setStatus(TEXT.expired, "error");
        return;
      case "canceled":
        setStatus(TEXT.canceled);
        return;
      default:
        setStatus(`The question ended (${job.status}).`);
    }
  }

  // Follows a job until it ends, with long-polls; network errors and 5xx back off.
  async function watchJob(jobId, opts = {}) {
    if (state.watch) endWatch(state.watch, { keepJob: true });
    const w = {
      jobId,
      ctrl: new AbortController(),
      canceling: false,
      since: Date.now(),
      sinceFromServer: false,
    };
    state.watch = w; // set synchronously: callers rely on it
    startElapsed(w);
    updateControls();

    const initial = opts.initialJob;
    if (initial && typeof initial === "object" && initial.status) {
      if (TERMINAL.has(initial.status)) {
        finishJob(w, initial);
        return;
      }
      showJobStatus(w, initial);
    } else {
      setStatus("Checking on your question…");
    }

    let backoff = BACKOFF_START_MS;
    let wait = typeof opts.wait === "number" ? opts.wait : POLL_WAIT_S;

    while (state.watch === w) {
      const t0 = Date.now();
      const res = await api("GET", `${jobUrl(jobId)}?wait=${wait}`, {
        signal: w.ctrl.signal,
        timeoutMs: (wait + 15) * 1000,
      });
      if (state.watch !== w || res.aborted) return;

      if (res.ok && res.data && typeof res.data === "object") {
        backoff = BACKOFF_START_MS;
        if (TERMINAL.has(res.data.status)) {
          finishJob(w, res.data);
          return;
        }
        showJobStatus(w, res.data);
        const usedWait = wait;
        wait = POLL_WAIT_S;
        const spent = Date.now() - t0;
        if (usedWait > 0 && spent < POLL_MIN_SPACING_MS) {
          await sleep(POLL_MIN_SPACING_MS - spent, w.ctrl.signal);
        }
        continue;
      }
      if (res.status === 404) {
        endWatch(w);
        setStatus(TEXT.gone, "error");
        return;
      }
      if (res.status === 401) {
        setSignedOut();
        return;
      }
      if (isRetryable(res) || res.status === 429 || (res.ok && !res.data)) {
        if (!w.canceling) setStatus(TEXT.retrying, "warn");
        let delay = backoff;
        if (res.retryAfter) delay = Math.min(Math.max(delay, res.retryAfter * 1000), BACKOFF_MAX_MS);
        await sleep(delay, w.ctrl.signal);
        backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
        wait = 0; // after a problem, get the current state at once
        continue;
      }
      endWatch(w);
      setStatus(describeError(res), "error");
      return;
    }
  }

  async function cancelJob() {
    const w = state.watch;
    if (!w || w.canceling) return;
    w.canceling = true;
    updateControls();
    setStatus("Canceling…");
    const res = await api("DELETE", jobUrl(w.jobId), { timeoutMs: 15000 });
    if (state.watch !== w) return; // the poll loop already saw the end
    if (res.ok && res.data && typeof res.data === "object" && TERMINAL.has(res.data.status)) {
      finishJob(w, res.data);
      return;
    }
    if (res.ok) {
      // Accepted but not ended yet: keep following it; the poll will report "canceled".
      return;
    }
    if (res.status === 404) {
      endWatch(w);
      setStatus(TEXT.gone, "error");
      return;
    }
    if (res.status === 401) {
      setSignedOut();
      return;
    }
    w.canceling = false;
    updateControls();
    setStatus(`Couldn't cancel: ${describeError(res)}`, "error");
  }

  /* ------------------------------------------------------------------ actions */

  async function send() {
    if (state.sending || state.watch || state.signedOut || state.switching) return;
    const text = els.message.value;
    if (!text.trim()) {
      setStatus("Type a question first.", "hint");
      els.message.focus();
      return;
    }
    state.sending = true;
    updateControls();
    let row = null;
    try {
      await state.ready;
      if (state.signedOut) return;
      const sid = state.sessionId || (await createSession());
      if (!sid) return; // status says why; the text is still in the box

      row = appendMessage("user", text, new Date(), { force: true });
      setMessageText("");
      setStatus("Sending…");

      const res = await api("POST", `${API}/ask`, { body: { session_id: sid, message: text } });
      if ((res.status === 202 || res.ok) && res.data && res.data.job_id) {
        store.set(JOB_KEY, res.data.job_id);
        store.set(PENDING_KEY, text);
        state.sending = false;
        watchJob(res.data.job_id, { initialJob: res.data, wait: POLL_WAIT_S });
        return;
      }

      // Refused: keep the bubble (marked) and give the text back so nothing is lost.
      markUnsent(row);
      if (!els.message.value) setMessageText(text);
      if (res.status === 401) {
        setSignedOut();
        return;
      }
      if (res.status === 404) {
        clearMessages();
        const id = await createSession();
        if (id) {
          setStatus(
            "That conversation is no longer available, so a new one was started. Press Send to ask again.",
            "error"
          );
        }
        return;
      }
      if (res.networkError) {
        setStatus("Connection problem: your question may not have been sent. Please try again.", "error");
        return;
      }
      setStatus(describeError(res), "error");
    } finally {
      state.sending = false;
      updateControls();
    }
  }

  async function newConversation() {
    if (state.switching || state.signedOut || state.sending) return;
    state.switching = true;
    updateControls();
    try {
      await state.ready;
      if (state.signedOut) return;
      if (state.watch) {
        // Leaving a question running would hold the per-user slot: stop it.
        const w = state.watch;
        endWatch(w);
        setStatus("Canceling the current question…");
        await api("DELETE", jobUrl(w.jobId), { timeoutMs: 10000 });
      }
      store.set(JOB_KEY, null);
      store.set(PENDING_KEY, null);
      clearMessages();
      setStatus("Starting a new conversation…");
      const id = await createSession();
      if (id) {
        clearMessages();
        setStatus("New conversation started.");
        els.message.focus();
      }
    } finally {
      state.switching = false;
      updateControls();
    }
  }

  async function resumeJob(jobId) {
    const pending = store.get(PENDING_KEY);
    if (pending && lastUserText() !== pending) {
      appendMessage("user", pending, null, { force: true });
    }
    await watchJob(jobId, { wait: 0 });
  }

  /* ------------------------------------------------------------------ startup */

  async function start() {
    setStatus("Loading…");
    checkHealth(); // independent; shows the demo banner when it answers

    const me = await withRetry(() => api("GET", `${API}/me`));
    if (me.status === 401) {
      setSignedOut();
      return;
    }
    if (me.ok && me.data && typeof me.data === "object") showUser(me.data.user);
    else els.user.textContent = "unknown user";

    const stored = store.get(SESSION_KEY);
    if (stored) {
      state.sessionId = stored;
      await loadHistory();
    } else {
      await createSession();
      renderHistory([]);
    }
    if (state.signedOut) return;

    if (isTransientStatus()) setStatus("");
    const jobId = store.get(JOB_KEY);
    if (jobId && state.sessionId) resumeJob(jobId);
  }

  function bind() {
    els = {
      messages: document.getElementById("messages"),
      conversation: document.getElementById("conversation"),
      emptyHint: document.getElementById("empty-hint"),
      typing: document.getElementById("typing"),
      status: document.getElementById("status"),
      spinner: document.getElementById("spinner"),
      elapsed: document.getElementById("elapsed"),
      form: document.getElementById("composer"),
      message: document.getElementById("message"),
      send: document.getElementById("send"),
      cancel: document.getElementById("cancel"),
      newSession: document.getElementById("new-session"),
      user: document.getElementById("user"),
      userLabel: document.getElementById("user-label"),
      demoBanner: document.getElementById("demo-banner"),
      serviceNote: document.getElementById("service-note"),
      charCount: document.getElementById("char-count"),
    };

    els.form.addEventListener("submit", (e) => {
      e.preventDefault();
      send();
    });

    els.message.addEventListener("keydown", (e) => {
      if (e.key !== "Enter" || e.isComposing || e.keyCode === 229) return;
      if (e.shiftKey || e.altKey) return; // Shift+Enter: newline
      e.preventDefault();
      if (!els.send.disabled) send();
    });

    els.message.addEventListener("input", () => {
      autoResize();
      updateCounter();
    });

    els.cancel.addEventListener("click", () => cancelJob());
    els.newSession.addEventListener("click", () => newConversation());
    window.addEventListener("resize", autoResize);

    updateControls();
    autoResize();
  }

  function main() {
    bind();
    state.ready = start().catch((err) => {
      // Should not happen (api() never throws); keep the page usable if it does.
      setStatus("Something went wrong while loading; please reload the page.", "error");
      if (window.console) console.error(err);
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", main);
  else main();
})();
