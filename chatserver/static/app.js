// The browser page of chatserver: one page, no build step, no external resources.
// The protocol lives in chatclient.js (connect, auth, join with since, sends kept across
// reconnects, reply streams, reconnect with backoff); this file is the page around it.
// Message text is set with textContent; agent replies are Markdown rendered by markdown.js
// (markdown-it, then DOMPurify, as DOM nodes): this code never parses a string as HTML.

import { ChatClient, randomId as uuid } from "./chatclient.js";
import { renderMarkdown } from "./markdown.js";

const HISTORY_PAGE = 50;
const ALERT_TTL_MS = 10000;
const TITLE_CHARS = 60;
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
  presence: $("presence"),
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
  freshToken: false, // the server refused the token: ask for a new one before reconnecting
  userId: null,
  agents: new Map(), // id -> agent
  conversations: new Map(), // id -> conversation (REST object)
  convOrder: [], // ids, most recently updated first
  convCursor: null,
  current: null, // the open conversation, see openConversation()
  pending: new Map(), // client_msg_id -> {clientMsgId, conversationId, text, el}
  starting: false, // a conversation is being created from the composer
  client: null,
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

function formatWait(ms) {
  const s = Math.max(1, Math.ceil(ms / 1000));
  if (s < 90) return `${s} s`;
  const min = Math.ceil(s / 60);
  if (min < 90) return `${min} min`;
  return `${Math.floor(min / 60)} h ${min % 60} min`;
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
  if (state.client) state.client.close(1000, "signed out");
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

async function socketToken() {
  if (state.freshToken && state.devMode) {
    state.token = await devToken(); // the dev token expired (or the server restarted)
  }
  state.freshToken = false;
  return state.token;
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
  updateControls();
}

function showAgentDescription() {
  const agent = state.agents.get(els.agent.value);
  els.agentDescription.textContent = agent ? agent.description || "" : "";
  if (!state.current) showEmptyChat();
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

async function createConversation(agentId, title) {
  const body = { agent_id: agentId };
  if (title) body.title = title;
  const conv = await api("/api/conversations", { method: "POST", body });
  state.conversations.set(conv.id, conv);
  state.convOrder = [conv.id, ...state.convOrder.filter((x) => x !== conv.id)];
  return conv;
}

async function startConversation(event) {
  event.preventDefault();
  const agentId = els.agent.value;
  if (!agentId) return;
  els.start.disabled = true;
  try {
    const conv = await createConversation(agentId, els.title.value.trim());
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

function showEmptyChat() {
  const agentId = els.agent.value;
  els.chatTitle.textContent = "New chat";
  els.chatSubtitle.textContent = agentId
    ? `Type a message to start a conversation with ${agentName(agentId)}, or open one from the list.`
    : "Start a conversation or open one from the list.";
  els.input.placeholder = agentId ? `Message ${agentName(agentId)}` : "Open a conversation to start chatting";
  els.presence.textContent = "";
}

function openConversation(conv) {
  const previous = state.current;
  if (previous && previous.id === conv.id) return;
  if (previous) state.client.leave(previous.id).catch(() => {});
  state.current = {
    id: conv.id,
    conv,
    oldestOffset: null,
    hasOlder: false,
    loadingOlder: false,
    joined: false,
    messages: new Map(), // offset -> {msg, el}
    generations: new Map(), // generation_id -> {id, stream, el, textEl, cancelling}
  };
  localStorage.setItem("chat.lastConversation", conv.id);
  els.messages.replaceChildren();
  els.presence.textContent = "";
  els.chatTitle.textContent = conversationLabel(conv);
  els.chatSubtitle.textContent = `with ${agentName(conv.agent_id)}`;
  els.input.placeholder = `Message ${agentName(conv.agent_id)}`;
  for (const p of state.pending.values()) if (p.conversationId === conv.id) els.messages.append(p.el);
  renderConversations();
  updateControls();
  const id = conv.id;
  state.client.join(id).catch((err) => {
    if (err.code === "closed" || state.current?.id !== id) return;
    if (err.code === "not_found" || err.code === "forbidden") localStorage.removeItem("chat.lastConversation");
    showAlert(`Could not open the conversation: ${err.message} (${err.code})`);
  });
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

/** The text of a message: Markdown for the agent's, plain text for people's. */
function fillText(node, role, text) {
  if (role === "assistant") {
    node.classList.add("markdown");
    node.replaceChildren(renderMarkdown(text));
  } else {
    node.textContent = text;
  }
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
  const text = el("div", { class: "text" });
  fillText(text, msg.role, msg.text ?? "");
  li.append(meta, text);
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

function showReply(c, stream) {
  let g = c.generations.get(stream.generationId);
  if (g) return g;
  const li = el("li", {
    class: "msg",
    "data-role": "assistant",
    "data-streaming": "true",
    "data-generation-id": stream.generationId,
    "aria-busy": "true",
  });
  const meta = el("div", { class: "meta" });
  meta.append(el("span", { class: "author" }, agentName(stream.agentId || c.conv.agent_id)));
  // The model thinks before it writes: say so until the first delta.
  const thinking = stream.thinking && stream.seq === 0;
  meta.append(el("span", { class: "typing-note" }, thinking ? "is thinking…" : "is replying…"));
  const text = el("div", { class: "text markdown" });
  li.append(meta, text);
  g = { id: stream.generationId, stream, el: li, textEl: text, cancelling: false, frame: 0 };
  c.generations.set(stream.generationId, g);
  keepScrolled(() => {
    const firstPending = els.messages.querySelector("li[data-pending]");
    els.messages.insertBefore(li, firstPending);
  });
  const render = () => {
    g.frame = 0;
    keepScrolled(() => g.textEl.replaceChildren(renderMarkdown(stream.text)));
  };
  stream.addEventListener("delta", () => {
    if (thinking && stream.seq > 0) setTypingNote(g, "is replying…");
    // Markdown is rendered whole: at most once per animation frame, however fast deltas come.
    if (!g.frame) g.frame = requestAnimationFrame(render);
  });
  stream.addEventListener("end", (event) => {
    if (g.frame) cancelAnimationFrame(g.frame);
    endReply(c, g, event.detail);
  });
  if (stream.text) render();
  updateControls();
  return g;
}

function setTypingNote(g, text) {
  const note = g.el.querySelector(".typing-note");
  if (note) note.textContent = text;
}

function endReply(c, g, end) {
  if (c.generations.get(g.id) !== g) return;
  if (end.error_code === "model_rate_limited") {
    const seconds = Math.ceil(Number(end.retry_after_ms) / 1000);
    const wait = seconds > 0 ? ` Try again in ${seconds} s.` : "";
    showAlert(`The model is busy right now (rate limit reached).${wait}`);
  }
  c.generations.delete(g.id);
  if (end.message && typeof end.message.offset === "number") {
    g.el.remove();
    const msg = { ...end.message };
    if (!msg.finish_reason) msg.finish_reason = end.finish_reason;
    if (state.current === c) upsertMessage(c, msg);
  } else if (end.missed) {
    g.el.remove(); // ended while we were away: what was stored comes with joined or history
  } else {
    // No stored message came with it: keep the partial text as a finished bubble.
    g.textEl.replaceChildren(renderMarkdown(g.stream.text));
    delete g.el.dataset.streaming;
    g.el.removeAttribute("aria-busy");
    g.el.querySelector(".typing-note")?.remove();
    const reason = end.finish_reason || "error";
    if (reason !== "stop") {
      g.el.dataset.finishReason = reason;
      g.el.append(el("div", { class: "finish" }, FINISH_LABELS[reason] || `(${reason})`));
    }
  }
  updateControls();
}

function updateControls() {
  const c = state.current;
  const ready = !state.fatal && (Boolean(c) || state.agents.size > 0);
  els.input.disabled = !ready;
  els.send.disabled = !ready || state.starting;
  const connected = Boolean(state.client?.connected);
  const streaming = Boolean(c) && connected && [...c.generations.values()].some((g) => !g.cancelling);
  els.stop.disabled = state.fatal || !streaming;
  els.loadOlder.hidden = !(c && c.hasOlder);
  els.loadOlder.disabled = !(c && connected && !c.loadingOlder);
}

function showPresence(frame) {
  const c = currentFor(frame.conversation_id);
  if (!c) return;
  const others = frame.online.filter((u) => u !== state.userId);
  els.presence.dataset.online = frame.online.join(" ");
  els.presence.textContent = others.length ? `Online: ${others.join(", ")}` : "Only you are here";
}

// ---------------------------------------------------------------------------------------
// sending, stopping, loading older messages

async function submitMessage(event) {
  event?.preventDefault();
  const text = els.input.value;
  if (!text.trim() || state.fatal || state.starting) return;
  if (!state.current) {
    // An empty page: the first message starts a conversation with the selected agent.
    const agentId = els.agent.value;
    if (!agentId) return;
    state.starting = true;
    updateControls();
    try {
      const title = text.trim().split(/\s+/).join(" ").slice(0, TITLE_CHARS);
      openConversation(await createConversation(agentId, title));
    } catch (err) {
      showAlert(`Could not start the conversation: ${err.message}`);
      return;
    } finally {
      state.starting = false;
      updateControls();
    }
  }
  const c = state.current;
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
  state.client.send(p.conversationId, p.text, { clientMsgId: p.clientMsgId }).catch((err) => {
    if (err.code === "closed") return;
    failPending(p, err);
  });
}

/** Why a send was refused, and when it may go again, for people. */
function refusal(err) {
  const wait = err.retryAfterMs;
  switch (err.code) {
    case "rate_limited":
      return { why: `Too many messages: ${err.message}.`, wait: wait ?? 1000 };
    case "quota_exceeded":
      return { why: `Daily limit reached: ${err.message}. It resets at midnight UTC.`, wait };
    case "too_large":
      return { why: `Too long: ${err.message}. Shorten it and send it again.`, wait: null };
    case "unavailable":
      return { why: `The server cannot take it right now: ${err.message}.`, wait: wait ?? 1000 };
    default:
      return { why: `${err.message} (${err.code}).`, wait };
  }
}

function failPending(p, err) {
  state.pending.delete(p.clientMsgId);
  const { why, wait } = refusal(err);
  p.el.dataset.failed = "true";
  p.el.dataset.errorCode = err.code;
  delete p.el.dataset.pending;
  const note = p.el.querySelector(".pending-note");
  if (note) note.textContent = "not sent";
  const reason = el("div", { class: "refusal", role: "status" });
  reason.append(el("span", { class: "refusal-why" }, why));
  const retry = el("button", { type: "button", class: "link" }, "Retry");
  if (wait !== null && wait !== undefined) {
    const until = Date.now() + wait;
    const when = el("span", { class: "refusal-when" });
    reason.append(" ", when);
    retry.disabled = true;
    const tick = () => {
      const left = until - Date.now();
      if (left <= 0 || !p.el.isConnected) {
        when.textContent = "You can retry now.";
        retry.disabled = false;
        return;
      }
      when.textContent = `You can retry in ${formatWait(left)}.`;
      setTimeout(tick, Math.min(1000, left));
    };
    tick();
  }
  retry.addEventListener("click", () => {
    // The same client_msg_id: a refused send appended nothing, a retry is stored once.
    delete p.el.dataset.failed;
    delete p.el.dataset.errorCode;
    p.el.dataset.pending = "true";
    reason.remove();
    retry.remove();
    if (note) note.textContent = "sending…";
    state.pending.set(p.clientMsgId, p);
    transmit(p);
  });
  p.el.append(reason, retry);
  showAlert(`Message not sent. ${why}${wait ? ` You can retry in ${formatWait(wait)}.` : ""}`);
}

function stopReply() {
  const c = state.current;
  if (!c || !state.client.connected) return;
  const running = [...c.generations.values()].filter((g) => !g.cancelling);
  const g = running[running.length - 1];
  if (!g) return;
  g.cancelling = true;
  updateControls();
  g.stream.cancel().catch((err) => {
    g.cancelling = false;
    updateControls();
    if (err.code !== "disconnected" && err.code !== "closed") showAlert(`Could not stop: ${err.message}`);
  });
}

async function loadOlder() {
  const c = state.current;
  if (!c || !state.client.connected || c.loadingOlder || c.oldestOffset === null) return;
  c.loadingOlder = true;
  updateControls();
  try {
    const page = await state.client.history(c.id, { before: c.oldestOffset, limit: HISTORY_PAGE });
    if (state.current === c) showOlder(c, page);
  } catch (err) {
    if (err.code !== "closed") showAlert(`Could not load older messages: ${err.message}`);
  } finally {
    c.loadingOlder = false;
    updateControls();
  }
}

function showOlder(c, page) {
  const scroller = els.scroller;
  const fromBottom = scroller.scrollHeight - scroller.scrollTop;
  for (const m of page.messages || []) {
    // Older messages go above: insertStored keeps offsets in order without scrolling.
    if (c.messages.has(m.offset)) continue;
    const li = renderMessage(m);
    insertStored(li, m.offset);
    c.messages.set(m.offset, { msg: m, el: li });
    if (c.oldestOffset === null || m.offset < c.oldestOffset) c.oldestOffset = m.offset;
  }
  scroller.scrollTop = scroller.scrollHeight - fromBottom; // keep the view where it was
  c.hasOlder = Boolean(page.has_more);
}

// ---------------------------------------------------------------------------------------
// the connection (chatclient.js) and what it reports

function onJoined({ frame: f, recovered }) {
  const c = currentFor(f.conversation_id);
  if (!c) return;
  const messages = Array.isArray(f.messages) ? f.messages : [];
  if (!recovered) clearWindow(c); // a fresh window: what we held may be stale (new epoch)
  for (const m of messages) upsertMessage(c, m);
  if (!recovered) c.hasOlder = c.oldestOffset !== null && c.oldestOffset > 1;
  // The module ended the streams of replies that ended while we were away; show the live one.
  for (const stream of state.client.replies(c.id)) showReply(c, stream);
  c.joined = true;
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

function connectClient() {
  const client = new ChatClient({ token: socketToken });
  state.client = client;
  client.addEventListener("open", (e) => {
    state.userId = e.detail.hello.user_id || state.userId;
    els.whoami.textContent = `Signed in as ${state.userId}`;
    setStatus("connected", "Connected");
    updateControls();
  });
  client.addEventListener("close", (e) => {
    if (state.current) state.current.joined = false;
    if (e.detail.code === 4401) {
      if (state.devMode) {
        state.freshToken = true;
      } else {
        sessionStorage.removeItem("chat.token");
        fatal("The server rejected the sign-in token. Open the page again with a fresh #token=… .");
        return;
      }
    }
    updateControls();
  });
  client.addEventListener("reconnecting", (e) => {
    const { delayMs, reason } = e.detail;
    if (reason === "server") setStatus("connecting", "The server is restarting. Reconnecting shortly…");
    else setStatus("offline", `Connection lost. Reconnecting in ${(delayMs / 1000).toFixed(1)} s…`);
  });
  client.addEventListener("reconnect", () => {
    setStatus("connecting", "The server is restarting. Reconnecting shortly…");
  });
  client.addEventListener("fatal", (e) => {
    if (!state.fatal) fatal(`Not connected: ${e.detail.message}.`);
  });
  client.addEventListener("joined", (e) => onJoined(e.detail));
  client.addEventListener("ack", (e) => onAck(e.detail));
  client.addEventListener("message", (e) => {
    const c = currentFor(e.detail.conversation_id);
    if (c) upsertMessage(c, e.detail);
  });
  client.addEventListener("reply", (e) => {
    const c = currentFor(e.detail.conversationId);
    if (c && c.joined) showReply(c, e.detail);
  });
  client.addEventListener("presence", (e) => showPresence(e.detail));
  client.addEventListener("left", (e) => {
    const c = currentFor(e.detail.conversation_id);
    if (c && !e.detail.ref) showAlert("You are no longer a member of this conversation.");
  });
  client.addEventListener("error", (e) => showAlert(`Server error: ${e.detail.message} (${e.detail.code})`));
  setStatus("connecting", "Connecting…");
  client.connect().catch(() => {}); // a fatal close is reported by the "fatal" event
}

// ---------------------------------------------------------------------------------------
// start-up

function wireUi() {
  els.newForm.addEventListener("submit", startConversation);
  els.agent.addEventListener("change", showAgentDescription);
  els.composer.addEventListener("submit", submitMessage);
  els.input.addEventListener("keydown", (event) => {
    // Enter sends; Shift+Enter is a new line (the textarea's own behaviour).
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) submitMessage(event);
  });
  els.input.addEventListener("input", () => {
    const c = state.current;
    if (c && c.joined && els.input.value) state.client.typing(c.id);
  });
  els.stop.addEventListener("click", stopReply);
  els.loadOlder.addEventListener("click", loadOlder);
  els.moreConvs.addEventListener("click", () =>
    loadConversations(true).catch((err) => showAlert(`Could not load conversations: ${err.message}`)),
  );
  window.addEventListener("online", () => state.client?.reconnectNow());
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
  connectClient();
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
  else if (!state.current) showEmptyChat();
}

main();
