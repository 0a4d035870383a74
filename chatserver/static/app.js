// The browser client of chatserver: one page, no build step, no external resources.
// Wire contract: docs/protocol.md (WebSocket subprotocol chat.v1.json, REST under /api).
// All message text is rendered with textContent, never as HTML.

const SUBPROTOCOL = "chat.v1.json";
const BACKOFF_BASE_MS = 500;
const BACKOFF_MAX_MS = 15000;
const HISTORY_PAGE = 50;
const ALERT_TTL_MS = 10000;
const FINISH_LABELS = {
  cancelled: "(stopped)",
  length: "(cut off: length limit)",
  safety: "(blocked by the safety filter)",
  error: "(interrupted by an error)",
};

const $ = (id) => document.getElementById(id);
const els = {
  whoami: $("whoami"),
  newForm: $("new-conversation"),
  agent: $("agent"),
  agentDescription: $("agent-description"),
  title: $("title"),
  start: $("start"),
  convList: $("conversation-list"),
  convEmpty: $("conversations-empty"),
  moreConvs: $("more-conversations"),
  chatTitle: $("chat-title"),
  chatSubtitle: $("chat-subtitle"),
  status: $("status"),
  alerts: $("alerts"),
  scroller: document.querySelector(".messages"),
  loadOlder: $("load-older"),
  messages: $("messages"),
  composer: $("composer"),
  input: $("message"),
  send: $("send"),
  stop: $("stop"),
};

const state = {
  token: null,
  devMode: false,
  userId: null,
  agents: new Map(), // id -> agent
  conversations: new Map(), // id -> conversation (REST object)
  convOrder: [], // ids, most recently updated first
  convCursor: null,
  current: null, // the open conversation, see openConversation()
  pending: new Map(), // client_msg_id -> {clientMsgId, conversationId, text, el}
  ws: null,
  ready: false, // hello received on state.ws
  attempts: 0,
  reconnectTimer: null,
  reconnectAfterMs: null, // from a `reconnect` frame
  heartbeatTimer: null,
  lastFrameAt: 0,
  heartbeatS: 30,
  fatal: false,
};

// ---------------------------------------------------------------------------------------
// small helpers

class ApiError extends Error {
  constructor(status, code, message) {
    super(message || `HTTP ${status}`);
    this.status = status;
    this.code = code || "http_" + status;
  }
}

function uuid() {
  if (globalThis.crypto && typeof crypto.randomUUID === "function") return crypto.randomUUID();
  // Outside a secure context randomUUID is missing; getRandomValues is always there.
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  if (text !== undefined) node.textContent = text;
  return node;
}

function formatTime(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return "";
  const sameDay = d.toDateString() === new Date().toDateString();
  return sameDay
    ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : d.toLocaleString([], { dateStyle: "short", timeStyle: "short" });
}

function showAlert(text, { sticky = false, kind = "error" } = {}) {
  const box = el("div", { class: `alert alert-${kind}` });
  box.append(el("span", {}, text));
  const close = el("button", { type: "button", class: "link", "aria-label": "Dismiss" }, "×");
  close.addEventListener("click", () => box.remove());
  box.append(close);
  els.alerts.append(box);
  while (els.alerts.children.length > 4) els.alerts.firstElementChild.remove();
  if (!sticky) setTimeout(() => box.remove(), ALERT_TTL_MS);
  return box;
}

function fatal(text) {
  state.fatal = true;
  els.alerts.replaceChildren();
  showAlert(text, { sticky: true });
  setStatus("offline", "Not connected");
  for (const c of [els.agent, els.title, els.start, els.input, els.send, els.stop]) c.disabled = true;
  if (state.agents.size === 0) els.agent.replaceChildren(el("option", { value: "" }, "Not available"));
  clearTimeout(state.reconnectTimer);
  if (state.ws) state.ws.close(1000, "signed out");
}

function setStatus(kind, text) {
  els.status.dataset.state = kind;
  els.status.textContent = text;
}

// ---------------------------------------------------------------------------------------
// authentication and REST

async function obtainToken() {
  const fragment = new URLSearchParams(location.hash.replace(/^#/, ""));
  const fromFragment = fragment.get("token");
  if (fromFragment) {
    sessionStorage.setItem("chat.token", fromFragment);
    // Keep the token out of the address bar (and out of copied links and screenshots).
    history.replaceState(null, "", location.pathname + location.search);
    return { token: fromFragment, dev: false };
  }
  const stored = sessionStorage.getItem("chat.token");
  if (stored) return { token: stored, dev: false };
  return { token: await devToken(), dev: true };
}

async function devToken() {
  let userId = localStorage.getItem("chat.userId");
  if (!userId) {
    userId = "web-" + uuid().replace(/-/g, "").slice(0, 12);
    localStorage.setItem("chat.userId", userId);
  }
  const res = await fetch("/api/dev/token", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ user_id: userId }),
  });
  if (res.status === 404) {
    throw new ApiError(
      404,
      "token_required",
      "This server needs a sign-in token. Open this page with #token=<your token> " +
        "at the end of the address (for example /#token=eyJ…).",
    );
  }
  const data = await res.json().catch(() => null);
  if (!res.ok || !data || typeof data.token !== "string") {
    throw new ApiError(res.status, data?.error?.code, data?.error?.message || "could not get a dev token");
  }
  state.userId = userId;
  return data.token;
}

async function api(path, { method = "GET", body, retried = false } = {}) {
  const headers = { Authorization: `Bearer ${state.token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await res.json().catch(() => null);
  if (res.ok) return data;
  if (res.status === 401 && state.devMode && !retried) {
    state.token = await devToken(); // the dev token expired: get a fresh one, once
    return api(path, { method, body, retried: true });
  }
  if (res.status === 401 && !state.devMode) sessionStorage.removeItem("chat.token");
  throw new ApiError(res.status, data?.error?.code, data?.error?.message);
}

// ---------------------------------------------------------------------------------------
// agents and conversations (sidebar)

async function loadAgents() {
  const data = await api("/api/agents");
  state.agents.clear();
  els.agent.replaceChildren();
  for (const agent of data.items || []) {
    state.agents.set(agent.id, agent);
    els.agent.append(el("option", { value: agent.id }, agent.name || agent.id));
  }
  if (state.agents.size === 0) els.agent.append(el("option", { value: "" }, "No agents available"));
  els.agent.disabled = state.agents.size === 0;
  els.start.disabled = state.agents.size === 0;
  showAgentDescription();
}

function showAgentDescription() {
  const agent = state.agents.get(els.agent.value);
  els.agentDescription.textContent = agent ? agent.description || "" : "";
}

function agentName(agentId) {
  return state.agents.get(agentId)?.name || agentId || "Assistant";
}

async function loadConversations(more = false) {
  const query = new URLSearchParams({ limit: "20" });
  if (more && state.convCursor) query.set("cursor", state.convCursor);
  const data = await api(`/api/conversations?${query}`);
  if (!more) {
    state.conversations.clear();
    state.convOrder = [];
  }
  for (const conv of data.items || []) {
    if (!state.conversations.has(conv.id)) state.convOrder.push(conv.id);
    state.conversations.set(conv.id, conv);
  }
  state.convCursor = data.has_more ? data.next_cursor : null;
  renderConversations();
}

function conversationLabel(conv) {
  return conv.title && conv.title.trim() ? conv.title.trim() : `Chat with ${agentName(conv.agent_id)}`;
}

function renderConversations() {
  els.convList.replaceChildren();
  for (const id of state.convOrder) {
    const conv = state.conversations.get(id);
    const current = state.current?.id === id;
    const button = el("button", {
      type: "button",
      class: "conversation",
      "data-conversation-id": id,
      "aria-current": current ? "true" : null,
    });
    button.append(
      el("span", { class: "conversation-title" }, conversationLabel(conv)),
      el("span", { class: "conversation-meta" }, `${agentName(conv.agent_id)} · ${formatTime(conv.updated_at)}`),
    );
    button.addEventListener("click", () => openConversation(conv));
    const item = el("li");
    item.append(button);
    els.convList.append(item);
  }
  els.convEmpty.hidden = state.convOrder.length > 0;
  els.moreConvs.hidden = !state.convCursor;
}

function touchConversation(id) {
  state.convOrder = [id, ...state.convOrder.filter((x) => x !== id)];
  const conv = state.conversations.get(id);
  if (conv) conv.updated_at = new Date().toISOString();
  renderConversations();
}

async function startConversation(event) {
  event.preventDefault();
  const agentId = els.agent.value;
  if (!agentId) return;
  const body = { agent_id: agentId };
  const title = els.title.value.trim();
  if (title) body.title = title;
  els.start.disabled = true;
  try {
    const conv = await api("/api/conversations", { method: "POST", body });
    state.conversations.set(conv.id, conv);
    state.convOrder = [conv.id, ...state.convOrder.filter((x) => x !== conv.id)];
    els.title.value = "";
    openConversation(conv);
    els.input.focus();
  } catch (err) {
    showAlert(`Could not start the conversation: ${err.message}`);
  } finally {
    els.start.disabled = state.fatal;
  }
}

// ---------------------------------------------------------------------------------------
// the open conversation

function openConversation(conv) {
  const previous = state.current;
  if (previous && previous.id === conv.id) return;
  if (previous && state.ready) sendFrame({ type: "leave", conversation_id: previous.id });
  state.current = {
    id: conv.id,
    conv,
    epoch: null,
    lastOffset: 0, // every offset up to this one has been seen: the `since` of a re-join
    oldestOffset: null,
    hasOlder: false,
    loadingOlder: false,
    joined: false,
    messages: new Map(), // offset -> {msg, el}
    generations: new Map(), // generation_id -> {id, seq, text, el, cancelling}
  };
  localStorage.setItem("chat.lastConversation", conv.id);
  els.messages.replaceChildren();
  els.chatTitle.textContent = conversationLabel(conv);
  els.chatSubtitle.textContent = `with ${agentName(conv.agent_id)}`;
  els.input.disabled = false;
  els.input.placeholder = `Message ${agentName(conv.agent_id)}`;
  for (const p of state.pending.values()) if (p.conversationId === conv.id) els.messages.append(p.el);
  renderConversations();
  updateControls();
  if (state.ready) joinCurrent();
}

function joinCurrent() {
  const c = state.current;
  if (!c || !state.ready) return;
  const frame = { type: "join", conversation_id: c.id, ref: "join" };
  if (c.epoch !== null) frame.since = { offset: c.lastOffset, epoch: c.epoch };
  sendFrame(frame);
}

function currentFor(conversationId) {
  const c = state.current;
  return c && c.id === conversationId ? c : null;
}

function isNearBottom() {
  const s = els.scroller;
  return s.scrollHeight - s.scrollTop - s.clientHeight < 80;
}

function keepScrolled(mutate) {
  const stick = isNearBottom();
  mutate();
  if (stick) els.scroller.scrollTop = els.scroller.scrollHeight;
}

function authorOf(msg) {
  if (msg.role === "assistant") return agentName(msg.agent_id);
  if (msg.role === "system") return "System";
  return msg.user_id && msg.user_id !== state.userId ? msg.user_id : "You";
}

function renderMessage(msg) {
  const li = el("li", {
    class: "msg",
    "data-role": msg.role,
    "data-offset": msg.offset,
    "data-id": msg.id,
  });
  const meta = el("div", { class: "meta" });
  meta.append(el("span", { class: "author" }, authorOf(msg)));
  if (msg.created_at) meta.append(el("time", { datetime: msg.created_at }, formatTime(msg.created_at)));
  li.append(meta, el("div", { class: "text" }, msg.text ?? ""));
  const reason = msg.finish_reason;
  if (reason && reason !== "stop") {
    li.dataset.finishReason = reason;
    li.append(el("div", { class: "finish" }, FINISH_LABELS[reason] || `(${reason})`));
  }
  return li;
}

// Stored messages first (by offset), then streaming replies, then unacknowledged sends.
function insertStored(li, offset) {
  for (const child of els.messages.children) {
    const childOffset = child.dataset.offset;
    if (childOffset === undefined || Number(childOffset) > offset) {
      els.messages.insertBefore(li, child);
      return;
    }
  }
  els.messages.append(li);
}

function upsertMessage(c, msg) {
  if (!msg || msg.conversation_id !== c.id || typeof msg.offset !== "number") return;
  const known = c.messages.get(msg.offset);
  if (known && known.msg.id === msg.id && known.msg.text === msg.text &&
      known.msg.finish_reason === msg.finish_reason) {
    return; // a duplicate (ack + message, or a re-join): already shown
  }
  const li = renderMessage(msg);
  keepScrolled(() => {
    if (known) known.el.replaceWith(li);
    else insertStored(li, msg.offset);
  });
  c.messages.set(msg.offset, { msg, el: li });
  if (c.oldestOffset === null || msg.offset < c.oldestOffset) c.oldestOffset = msg.offset;
  while (c.messages.has(c.lastOffset + 1)) c.lastOffset += 1;
  if (msg.client_msg_id && state.pending.has(msg.client_msg_id)) {
    state.pending.get(msg.client_msg_id).el.remove();
    state.pending.delete(msg.client_msg_id);
  }
}

function clearWindow(c) {
  for (const { el: li } of c.messages.values()) li.remove();
  for (const g of c.generations.values()) g.el.remove();
  c.messages.clear();
  c.generations.clear();
  c.oldestOffset = null;
}

function ensureGeneration(c, generationId, agentId) {
  let g = c.generations.get(generationId);
  if (g) return g;
  const li = el("li", {
    class: "msg",
    "data-role": "assistant",
    "data-streaming": "true",
    "data-generation-id": generationId,
    "aria-busy": "true",
  });
  const meta = el("div", { class: "meta" });
  meta.append(el("span", { class: "author" }, agentName(agentId || c.conv.agent_id)));
  meta.append(el("span", { class: "typing-note" }, "is replying…"));
  const text = el("div", { class: "text" });
  li.append(meta, text);
  g = { id: generationId, seq: 0, text: "", el: li, textEl: text, cancelling: false };
  c.generations.set(generationId, g);
  keepScrolled(() => {
    const firstPending = els.messages.querySelector("li[data-pending]");
    els.messages.insertBefore(li, firstPending);
  });
  updateControls();
  return g;
}

function setTypingNote(g, text) {
  const note = g.el.querySelector(".typing-note");
  if (note) note.textContent = text;
}

function setGenerationText(g, text, seq) {
  if (g.seq === 0 && seq > 0) setTypingNote(g, "is replying…");
  g.text = text;
  g.seq = seq;
  keepScrolled(() => {
    g.textEl.textContent = text;
  });
}

function updateControls() {
  const c = state.current;
  const open = Boolean(c) && !state.fatal;
  els.input.disabled = !open;
  els.send.disabled = !open;
  const streaming = open && state.ready && [...c.generations.values()].some((g) => !g.cancelling);
  els.stop.disabled = !streaming;
  els.loadOlder.hidden = !(open && c.hasOlder);
  els.loadOlder.disabled = !(open && state.ready && !c.loadingOlder);
}

// ---------------------------------------------------------------------------------------
// sending, stopping, loading older messages

function submitMessage(event) {
  event?.preventDefault();
  const c = state.current;
  const text = els.input.value;
  if (!c || !text.trim()) return;
  const clientMsgId = uuid();
  const li = el("li", { class: "msg", "data-role": "user", "data-pending": "true" });
  const meta = el("div", { class: "meta" });
  meta.append(el("span", { class: "author" }, "You"), el("span", { class: "pending-note" }, "sending…"));
  li.append(meta, el("div", { class: "text" }, text));
  const p = { clientMsgId, conversationId: c.id, text, el: li };
  state.pending.set(clientMsgId, p);
  keepScrolled(() => els.messages.append(li));
  els.scroller.scrollTop = els.scroller.scrollHeight;
  els.input.value = "";
  touchConversation(c.id);
  transmit(p);
}

function transmit(p) {
  const c = state.current;
  if (!state.ready || !c || !c.joined || c.id !== p.conversationId) return; // sent after (re)join
  sendFrame({
    type: "send",
    conversation_id: p.conversationId,
    client_msg_id: p.clientMsgId,
    text: p.text,
    ref: p.clientMsgId,
  });
}

function failPending(p, why) {
  state.pending.delete(p.clientMsgId);
  p.el.dataset.failed = "true";
  delete p.el.dataset.pending;
  const note = p.el.querySelector(".pending-note");
  if (note) note.textContent = `not sent: ${why}`;
  const retry = el("button", { type: "button", class: "link" }, "Retry");
  retry.addEventListener("click", () => {
    p.el.remove();
    if (state.current?.id === p.conversationId) {
      els.input.value = p.text;
      submitMessage();
    }
  });
  p.el.append(retry);
}

function stopReply() {
  const c = state.current;
  if (!c || !state.ready) return;
  const running = [...c.generations.values()].filter((g) => !g.cancelling);
  const g = running[running.length - 1];
  if (!g) return;
  g.cancelling = true;
  sendFrame({ type: "cancel", generation_id: g.id, ref: "cancel:" + g.id });
  updateControls();
}

function loadOlder() {
  const c = state.current;
  if (!c || !state.ready || c.loadingOlder || c.oldestOffset === null) return;
  c.loadingOlder = true;
  sendFrame({
    type: "history",
    conversation_id: c.id,
    before: c.oldestOffset,
    limit: HISTORY_PAGE,
    ref: "older",
  });
  updateControls();
}

// ---------------------------------------------------------------------------------------
// the WebSocket

function wsUrl() {
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws`;
}

function sendFrame(frame) {
  const ws = state.ws;
  if (!ws || ws.readyState !== WebSocket.OPEN) return false;
  ws.send(JSON.stringify(frame));
  return true;
}

function connect() {
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = null;
  if (state.fatal) return;
  if (state.ws) return;
  setStatus("connecting", state.attempts ? "Reconnecting…" : "Connecting…");
  const ws = new WebSocket(wsUrl(), SUBPROTOCOL);
  state.ws = ws;
  state.ready = false;
  ws.addEventListener("open", () => {
    ws.send(JSON.stringify({ type: "auth", token: state.token }));
  });
  ws.addEventListener("message", (event) => {
    if (state.ws !== ws) return;
    state.lastFrameAt = Date.now();
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch {
      return;
    }
    if (frame && typeof frame.type === "string") handleFrame(frame);
  });
  ws.addEventListener("close", (event) => {
    if (state.ws !== ws) return;
    state.ws = null;
    state.ready = false;
    clearInterval(state.heartbeatTimer);
    if (state.current) state.current.joined = false;
    updateControls();
    onClosed(event);
  });
}

async function onClosed(event) {
  if (state.fatal) return;
  if (event.code === 4401) {
    if (state.devMode) {
      try {
        state.token = await devToken();
      } catch (err) {
        fatal(`Sign-in failed: ${err.message}`);
        return;
      }
    } else {
      sessionStorage.removeItem("chat.token");
      fatal("The server rejected the sign-in token. Open the page again with a fresh #token=… .");
      return;
    }
  }
  if (event.code === 4403) {
    fatal("The server does not accept connections from this page's origin.");
    return;
  }
  let delay;
  if (state.reconnectAfterMs !== null) {
    delay = state.reconnectAfterMs + Math.random() * 250;
    state.reconnectAfterMs = null;
    state.attempts = Math.max(state.attempts, 1);
  } else {
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** state.attempts);
    delay = ceiling / 2 + (Math.random() * ceiling) / 2;
    state.attempts += 1;
  }
  scheduleReconnect(delay);
}

function scheduleReconnect(delayMs) {
  clearTimeout(state.reconnectTimer);
  setStatus("offline", `Connection lost. Reconnecting in ${(delayMs / 1000).toFixed(1)} s…`);
  state.reconnectTimer = setTimeout(connect, delayMs);
}

function startHeartbeat() {
  clearInterval(state.heartbeatTimer);
  const periodMs = Math.max(5, state.heartbeatS) * 1000;
  state.heartbeatTimer = setInterval(() => {
    const ws = state.ws;
    if (!ws) return;
    if (Date.now() - state.lastFrameAt > 2 * periodMs + 5000) {
      ws.close(4000, "no traffic"); // a silently dead connection: the close handler reconnects
      return;
    }
    sendFrame({ type: "ping", ts: Date.now() });
  }, periodMs);
}

// ---------------------------------------------------------------------------------------
// server frames

function handleFrame(f) {
  switch (f.type) {
    case "hello":
      return onHello(f);
    case "joined":
      return onJoined(f);
    case "ack":
      return onAck(f);
    case "message": {
      const c = currentFor(f.message?.conversation_id);
      if (c) upsertMessage(c, f.message);
      return;
    }
    case "gen_start": {
      const c = currentFor(f.conversation_id);
      if (!c) return;
      const g = ensureGeneration(c, f.generation_id, f.agent_id);
      // The model thinks before it writes: say so until the first delta.
      if (f.thinking === true && g.seq === 0) setTypingNote(g, "is thinking…");
      return;
    }
    case "delta":
      return onDelta(f);
    case "gen_end":
      return onGenEnd(f);
    case "history":
      return onHistory(f);
    case "reconnect":
      state.reconnectAfterMs = Math.max(0, Number(f.after_ms) || 0);
      setStatus("connecting", "The server is restarting. Reconnecting shortly…");
      return;
    case "error":
      return onError(f);
    default:
      return; // pong, left, typing and future frames: nothing to do
  }
}

function onHello(f) {
  state.ready = true;
  state.attempts = 0;
  state.userId = f.user_id || state.userId;
  state.heartbeatS = Number(f.heartbeat_s) || 30;
  els.whoami.textContent = `Signed in as ${state.userId}`;
  setStatus("connected", "Connected");
  startHeartbeat();
  joinCurrent();
  updateControls();
}

function onJoined(f) {
  const c = currentFor(f.conversation_id);
  if (!c) return;
  const recovered = f.recovered === true && c.epoch !== null && c.epoch === f.epoch;
  const messages = Array.isArray(f.messages) ? f.messages : [];
  if (!recovered) {
    // A fresh window: what we held may be stale (new epoch), so start over from the server's.
    clearWindow(c);
    c.lastOffset = Number(f.offset) || 0;
  }
  for (const m of messages) upsertMessage(c, m);
  if (!recovered) {
    c.hasOlder = c.oldestOffset !== null && c.oldestOffset > 1;
    c.lastOffset = Math.max(c.lastOffset, Number(f.offset) || 0);
  }
  c.epoch = f.epoch;
  // Replies that ended while we were away are in `messages`; drop their streaming bubbles.
  const live = f.generation || null;
  for (const g of [...c.generations.values()]) {
    if (!live || g.id !== live.generation_id) {
      g.el.remove();
      c.generations.delete(g.id);
    }
  }
  if (live) {
    const g = ensureGeneration(c, live.generation_id);
    setGenerationText(g, live.text || "", Number(live.seq) || 0);
  }
  c.joined = true;
  c.loadingOlder = false;
  for (const p of state.pending.values()) if (p.conversationId === c.id) transmit(p);
  updateControls();
  if (!recovered) els.scroller.scrollTop = els.scroller.scrollHeight;
}

function onAck(f) {
  const p = state.pending.get(f.client_msg_id);
  if (!p) return;
  const c = currentFor(p.conversationId);
  if (c) {
    upsertMessage(c, {
      id: f.message_id,
      conversation_id: p.conversationId,
      offset: f.offset,
      role: "user",
      user_id: state.userId,
      text: p.text,
      created_at: f.created_at,
      client_msg_id: p.clientMsgId,
    });
  }
  p.el.remove();
  state.pending.delete(f.client_msg_id);
}

function onDelta(f) {
  const c = currentFor(f.conversation_id);
  if (!c) return;
  const g = ensureGeneration(c, f.generation_id);
  const seq = Number(f.seq);
  if (!(seq > g.seq)) return; // already have it (e.g. included in joined.generation)
  setGenerationText(g, g.text + (f.text || ""), seq);
}

function onGenEnd(f) {
  const c = currentFor(f.conversation_id);
  if (!c) return;
  if (f.error_code === "model_rate_limited") {
    const seconds = Math.ceil(Number(f.retry_after_ms) / 1000);
    const wait = seconds > 0 ? ` Try again in ${seconds} s.` : "";
    showAlert(`The model is busy right now (rate limit reached).${wait}`);
  }
  const g = c.generations.get(f.generation_id);
  if (f.message && typeof f.message.offset === "number") {
    const msg = { ...f.message };
    if (!msg.finish_reason) msg.finish_reason = f.finish_reason;
    if (g) {
      g.el.remove();
      c.generations.delete(g.id);
    }
    upsertMessage(c, msg);
  } else if (g) {
    // No stored message came with it: keep the partial text as a finished bubble.
    c.generations.delete(g.id);
    delete g.el.dataset.streaming;
    g.el.removeAttribute("aria-busy");
    g.el.querySelector(".typing-note")?.remove();
    const reason = f.finish_reason || "error";
    if (reason !== "stop") {
      g.el.dataset.finishReason = reason;
      g.el.append(el("div", { class: "finish" }, FINISH_LABELS[reason] || `(${reason})`));
    }
  }
  updateControls();
}

function onHistory(f) {
  const c = currentFor(f.conversation_id);
  if (!c) return;
  const scroller = els.scroller;
  const fromBottom = scroller.scrollHeight - scroller.scrollTop;
  for (const m of f.messages || []) {
    // Older messages go above: insertStored keeps offsets in order without scrolling.
    if (c.messages.has(m.offset)) continue;
    const li = renderMessage(m);
    insertStored(li, m.offset);
    c.messages.set(m.offset, { msg: m, el: li });
    if (c.oldestOffset === null || m.offset < c.oldestOffset) c.oldestOffset = m.offset;
  }
  scroller.scrollTop = scroller.scrollHeight - fromBottom; // keep the view where it was
  c.hasOlder = Boolean(f.has_more);
  c.loadingOlder = false;
  updateControls();
}

function onError(f) {
  const ref = typeof f.ref === "string" ? f.ref : "";
  const detail = `${f.message || "error"}` + (f.code ? ` (${f.code})` : "");
  const p = state.pending.get(ref);
  if (p) {
    let why = detail;
    if (f.code === "rate_limited" && f.retry_after_ms) {
      why += `; try again in ${Math.ceil(f.retry_after_ms / 1000)} s`;
    }
    failPending(p, why);
    showAlert(`Message not sent: ${why}`);
    return;
  }
  const c = state.current;
  if (ref.startsWith("cancel:") && c) {
    const g = c.generations.get(ref.slice("cancel:".length));
    if (g) g.cancelling = false;
    updateControls();
    if (f.code === "not_found") return; // the reply ended before the cancel arrived
  }
  if (ref === "older" && c) {
    c.loadingOlder = false;
    updateControls();
  }
  if (ref === "join" && c && (f.code === "not_found" || f.code === "forbidden")) {
    localStorage.removeItem("chat.lastConversation");
  }
  showAlert(`Server error: ${detail}`);
}

// ---------------------------------------------------------------------------------------
// start-up

function wireUi() {
  els.newForm.addEventListener("submit", startConversation);
  els.agent.addEventListener("change", showAgentDescription);
  els.composer.addEventListener("submit", submitMessage);
  els.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) submitMessage(event);
  });
  els.stop.addEventListener("click", stopReply);
  els.loadOlder.addEventListener("click", loadOlder);
  els.moreConvs.addEventListener("click", () =>
    loadConversations(true).catch((err) => showAlert(`Could not load conversations: ${err.message}`)),
  );
  window.addEventListener("online", () => {
    if (!state.ws && !state.fatal) connect();
  });
}

async function main() {
  wireUi();
  setStatus("connecting", "Signing in…");
  try {
    const { token, dev } = await obtainToken();
    state.token = token;
    state.devMode = dev;
    if (state.userId) els.whoami.textContent = `Signed in as ${state.userId}`;
  } catch (err) {
    fatal(err.message || "Sign-in failed.");
    return;
  }
  connect();
  try {
    await Promise.all([loadAgents(), loadConversations()]);
  } catch (err) {
    if (err.status === 401) {
      fatal(`The server rejected the sign-in token (${err.message}). Open the page with a fresh #token=… .`);
    } else {
      showAlert(`Could not load: ${err.message}`);
    }
    return;
  }
  renderConversations(); // agent names are known now
  const last = localStorage.getItem("chat.lastConversation");
  if (last && state.conversations.has(last) && !state.current) openConversation(state.conversations.get(last));
}

main();
