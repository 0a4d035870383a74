// chatclient.js: a browser client of chatserver's wire protocol v1, as an ES module.
// The contract is docs/protocol.md; this module's own API is documented there too ("The browser
// module") and typed in chatclient.d.ts. No dependencies, no build step.
//
//   import { ChatClient } from "/static/chatclient.js";
//   const client = new ChatClient({ token: () => fetchToken() });
//   client.addEventListener("reply", (e) => e.detail.addEventListener("delta", render));
//   await client.connect();
//   await client.join(conversationId);          // rejoined with `since` after every reconnect
//   const ack = await client.send(conversationId, "Hello");  // resent after a reconnect
//
// What it keeps, so that a reconnect loses nothing and repeats nothing: per joined conversation
// the epoch and the highest offset seen without a gap (the `since` of the next join); every send
// not yet acked, with its client_msg_id; every reply still streaming, with its seq.

export const SUBPROTOCOL = "chat.v1.json";
export const PROTOCOL_VERSION = 1;

const DEFAULTS = { baseMs: 500, maxMs: 15000 };
const RECONNECT_JITTER_MS = 250;
const SEEN_AHEAD_MAX = 1000; // offsets held past a gap before the gap is given up
// Close codes after which reconnecting cannot help.
const FATAL_CLOSES = new Map([
  [4403, "the server does not accept connections from this page's origin"],
]);

/** An `error` frame answering one of our frames, or a request cut off by a disconnect. */
export class ChatError extends Error {
  constructor(code, message, { retryAfterMs = null, ref = null, frame = null } = {}) {
    super(message || code);
    this.name = "ChatError";
    this.code = code;
    this.retryAfterMs = retryAfterMs;
    this.ref = ref;
    this.frame = frame;
  }

  static of(frame) {
    const retry = typeof frame.retry_after_ms === "number" ? frame.retry_after_ms : null;
    return new ChatError(frame.code, frame.message, { retryAfterMs: retry, ref: frame.ref ?? null, frame });
  }
}

function emit(target, type, detail) {
  target.dispatchEvent(new CustomEvent(type, { detail }));
}

export function randomId() {
  if (globalThis.crypto && typeof crypto.randomUUID === "function") return crypto.randomUUID();
  // Outside a secure context randomUUID is missing; getRandomValues is always there.
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** The capped exponential delay with jitter of the `attempt`-th reconnect (1, 2, ...). */
export function backoffDelay(attempt, { baseMs = DEFAULTS.baseMs, maxMs = DEFAULTS.maxMs } = {}, random = Math.random) {
  const ceiling = Math.min(maxMs, baseMs * 2 ** Math.max(0, attempt - 1));
  return ceiling / 2 + (random() * ceiling) / 2;
}

/**
 * One agent reply as it streams. Events: "delta" (detail: {seq, text, delta}) for every new
 * piece, "end" (detail: the gen_end frame). `done` resolves with the gen_end frame.
 */
export class ReplyStream extends EventTarget {
  constructor(
    client,
    conversationId,
    generationId,
    { agentId = null, model = null, replyTo = null, thinking = false } = {},
  ) {
    super();
    this._client = client;
    this.conversationId = conversationId;
    this.generationId = generationId;
    this.agentId = agentId;
    this.model = model;
    this.replyTo = replyTo;
    this.thinking = thinking; // the model may think before its first delta (gen_start.thinking)
    this.seq = 0;
    this.text = "";
    this.end = null;
    this.done = new Promise((resolve) => {
      this._resolve = resolve;
    });
  }

  get ended() {
    return this.end !== null;
  }

  /** Stop the reply (every member sees it end with finish_reason "cancelled"). */
  cancel() {
    return this._client.cancel(this.generationId);
  }

  _take(seq, piece) {
    if (!(seq > this.seq)) return false; // had it already (a join's snapshot covered it)
    this.seq = seq;
    this.text += piece;
    emit(this, "delta", { seq, text: this.text, delta: piece });
    return true;
  }

  _snapshot(seq, text) {
    if (seq <= this.seq) return; // nothing past what this stream has
    const delta = text.slice(this.text.length);
    this.seq = seq;
    this.text = text;
    emit(this, "delta", { seq, text, delta });
  }

  _finish(frame) {
    if (this.end !== null) return;
    this.end = frame;
    emit(this, "end", frame);
    this._resolve(frame);
  }
}

class Conversation {
  constructor(id) {
    this.id = id;
    this.epoch = null;
    this.lastOffset = 0; // every offset up to this one was seen: the `since` of a rejoin
    this.ahead = new Set(); // offsets seen past a gap
    this.wanted = false; // joined by the application: rejoined after a reconnect
    this.joined = false; // joined on the current connection
    this.online = null; // the last presence list
  }

  see(offset) {
    if (typeof offset !== "number" || offset <= this.lastOffset) return;
    this.ahead.add(offset);
    while (this.ahead.has(this.lastOffset + 1)) {
      this.lastOffset += 1;
      this.ahead.delete(this.lastOffset);
    }
    if (this.ahead.size > SEEN_AHEAD_MAX) {
      // A gap that never filled: resume past it (a rejoin will not recover it).
      this.lastOffset = Math.max(...this.ahead);
      this.ahead.clear();
    }
  }

  since() {
    return this.epoch === null ? null : { offset: this.lastOffset, epoch: this.epoch };
  }
}

export class ChatClient extends EventTarget {
  /**
   * @param {object} options see chatclient.d.ts (ChatClientOptions)
   */
  constructor(options = {}) {
    super();
    this.url = options.url || ChatClient.defaultUrl();
    this._token = options.token;
    this._backoff = { ...DEFAULTS, ...(options.backoff || {}) };
    this._WebSocket = options.WebSocket || globalThis.WebSocket;
    this._heartbeat = options.heartbeat !== false;
    this.state = "idle"; // idle | connecting | open | closed
    this.userId = null;
    this.sessionId = null;
    this.serverId = null;
    this.attempts = 0;
    this._ws = null;
    this._refs = 0;
    this._requests = new Map(); // ref -> {kind, resolve, reject, conversationId?}
    this._sends = new Map(); // client_msg_id -> {conversationId, text, ref, resolve, reject, sent}
    this._cancels = new Map(); // generation_id -> [{resolve, reject, ref}]
    this._conversations = new Map();
    this._replies = new Map(); // generation_id -> ReplyStream
    this._reconnectAfterMs = null; // from a `reconnect` frame
    this._timer = null;
    this._beat = null;
    this._lastFrameAt = 0;
    this._heartbeatS = 30;
    this._connected = null; // {resolve, reject} of connect()
  }

  static defaultUrl() {
    return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws`;
  }

  // -- lifecycle -----------------------------------------------------------------------

  /** Open the connection (and keep it open); resolves with the first `hello`. */
  connect() {
    if (this.state === "open") return Promise.resolve(this.hello);
    const promise = new Promise((resolve, reject) => {
      this._connected = { resolve, reject };
    });
    if (this.state !== "connecting") {
      this.state = "connecting";
      this._open();
    }
    return promise;
  }

  /** Close for good: no reconnect; requests still waiting are rejected. */
  close(code = 1000, reason = "closed by the client") {
    this.state = "closed";
    clearTimeout(this._timer);
    clearInterval(this._beat);
    const ws = this._ws;
    this._ws = null;
    if (ws) ws.close(code, reason);
    this._failAll(new ChatError("closed", "the client was closed"), true);
    if (this._connected) {
      this._connected.reject(new ChatError("closed", "the client was closed"));
      this._connected = null;
    }
  }

  /** Reconnect at once if waiting to (the browser came back online, say). */
  reconnectNow() {
    if (this.state === "connecting" && this._ws === null) {
      clearTimeout(this._timer);
      this._open();
    }
  }

  get connected() {
    return this.state === "open";
  }

  async _open() {
    this._timer = null;
    if (this.state === "closed" || this._ws) return;
    let token;
    try {
      token = typeof this._token === "function" ? await this._token() : this._token;
    } catch (err) {
      this._fatal(0, `no token: ${err.message || err}`);
      return;
    }
    if (this.state === "closed" || this._ws) return;
    const ws = new this._WebSocket(this.url, SUBPROTOCOL);
    this._ws = ws;
    ws.addEventListener("open", () => {
      if (this._ws === ws) ws.send(JSON.stringify({ type: "auth", token }));
    });
    ws.addEventListener("message", (event) => {
      if (this._ws !== ws) return;
      this._lastFrameAt = Date.now();
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      if (frame && typeof frame.type === "string") this._frame(frame);
    });
    ws.addEventListener("close", (event) => {
      if (this._ws !== ws) return;
      this._closed(event.code, event.reason);
    });
  }

  _closed(code, reason) {
    this._ws = null;
    clearInterval(this._beat);
    const wasOpen = this.state === "open";
    for (const c of this._conversations.values()) c.joined = false;
    for (const s of this._sends.values()) s.sent = false;
    this._failAll(new ChatError("disconnected", "the connection closed before the answer"), false);
    emit(this, "close", { code, reason, wasOpen });
    if (this.state === "closed") return;
    const fatal = FATAL_CLOSES.get(code);
    if (fatal) {
      this._fatal(code, fatal);
      return;
    }
    if (code === 4401 && typeof this._token !== "function") {
      this._fatal(code, "the server rejected the token");
      return;
    }
    this.state = "connecting";
    let delayMs;
    let why = "backoff";
    if (this._reconnectAfterMs !== null) {
      delayMs = this._reconnectAfterMs + Math.random() * RECONNECT_JITTER_MS;
      this._reconnectAfterMs = null;
      this.attempts = Math.max(this.attempts, 1);
      why = "server";
    } else {
      this.attempts += 1;
      delayMs = backoffDelay(this.attempts, this._backoff);
    }
    emit(this, "reconnecting", { delayMs, attempt: this.attempts, code, reason: why });
    this._timer = setTimeout(() => this._open(), delayMs);
  }

  _fatal(code, message) {
    this.state = "closed";
    this._failAll(new ChatError("closed", message), true);
    if (this._connected) {
      this._connected.reject(new ChatError("closed", message));
      this._connected = null;
    }
    emit(this, "fatal", { code, message });
  }

  /** Reject waiting requests; with `everything`, also the sends and joins kept for a reconnect. */
  _failAll(error, everything) {
    for (const [ref, req] of [...this._requests]) {
      if (req.kind === "join" && !everything) continue; // answered by the rejoin
      this._requests.delete(ref);
      req.reject(error);
    }
    for (const waiters of this._cancels.values()) for (const w of waiters) w.reject(error);
    this._cancels.clear();
    if (everything) {
      for (const s of this._sends.values()) s.reject(error);
      this._sends.clear();
    }
  }

  _startHeartbeat() {
    clearInterval(this._beat);
    if (!this._heartbeat) return;
    const periodMs = Math.max(5, this._heartbeatS) * 1000;
    this._beat = setInterval(() => {
      const ws = this._ws;
      if (!ws || this.state !== "open") return;
      if (Date.now() - this._lastFrameAt > 2 * periodMs + 5000) {
        ws.close(4000, "no traffic"); // silently dead: the close handler reconnects
        return;
      }
      this._send({ type: "ping", ts: Date.now() });
    }, periodMs);
  }

  // -- requests ------------------------------------------------------------------------

  _ref(prefix) {
    this._refs += 1;
    return `${prefix}${this._refs}`;
  }

  _send(frame) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1 || this.state !== "open") return false;
    ws.send(JSON.stringify(frame));
    return true;
  }

  _request(kind, frame, extra = {}) {
    return new Promise((resolve, reject) => {
      const ref = this._ref(kind[0]);
      this._requests.set(ref, { kind, resolve, reject, ...extra });
      if (!this._send({ ...frame, ref })) {
        this._requests.delete(ref);
        reject(new ChatError("disconnected", "not connected"));
      }
    });
  }

  conversation(conversationId) {
    let c = this._conversations.get(conversationId);
    if (!c) {
      c = new Conversation(conversationId);
      this._conversations.set(conversationId, c);
    }
    return c;
  }

  /** Where a rejoin would resume: {offset, epoch}, or null before the first `joined`. */
  since(conversationId) {
    return this._conversations.get(conversationId)?.since() ?? null;
  }

  /**
   * Join (subscribe to the live frames); resolves with `joined`. Kept joined: after a
   * reconnect it is joined again with `since`, so only what was missed comes back.
   */
  join(conversationId, { since } = {}) {
    const c = this.conversation(conversationId);
    c.wanted = true;
    return new Promise((resolve, reject) => {
      const ref = this._ref("j");
      this._requests.set(ref, { kind: "join", resolve, reject, conversationId });
      if (this.state === "open") this._sendJoin(c, ref, since);
    });
  }

  _sendJoin(c, ref, since) {
    const frame = { type: "join", conversation_id: c.id, ref };
    const from = since === undefined ? c.since() : since;
    if (from) frame.since = from;
    this._send(frame);
  }

  leave(conversationId) {
    const c = this.conversation(conversationId);
    c.wanted = false;
    c.joined = false;
    this._forgetReplies(conversationId);
    return this._request("leave", { type: "leave", conversation_id: conversationId });
  }

  /** Not joined any more: its streaming replies will hear no more (a rejoin starts anew). */
  _forgetReplies(conversationId) {
    for (const stream of this.replies(conversationId)) this._replies.delete(stream.generationId);
  }

  /**
   * Send a message; resolves with its `ack`, rejects with a ChatError when refused (its
   * `code` and `retryAfterMs` say why and when to try again). Until acked it is kept and sent
   * again, with the same client_msg_id, after a reconnect: it is stored once either way.
   */
  send(conversationId, text, { clientMsgId } = {}) {
    const id = clientMsgId || randomId();
    return new Promise((resolve, reject) => {
      const entry = { conversationId, text, clientMsgId: id, ref: null, resolve, reject, sent: false };
      this._sends.set(id, entry);
      this._transmit(entry);
    });
  }

  /** The sends not yet acked: {clientMsgId, conversationId, text}. */
  get unacked() {
    return [...this._sends.values()].map(({ clientMsgId, conversationId, text }) => ({
      clientMsgId,
      conversationId,
      text,
    }));
  }

  _transmit(entry) {
    if (entry.sent || this.state !== "open") return;
    const c = this._conversations.get(entry.conversationId);
    if (c && c.wanted && !c.joined) return; // after its rejoin: the order is ack, message, reply
    entry.ref = this._ref("s");
    entry.sent = this._send({
      type: "send",
      conversation_id: entry.conversationId,
      client_msg_id: entry.clientMsgId,
      text: entry.text,
      ref: entry.ref,
    });
  }

  /** Stop a running reply; resolves when it ended (finish_reason "cancelled", or it was over). */
  cancel(generationId) {
    return new Promise((resolve, reject) => {
      const ref = this._ref("c");
      const waiters = this._cancels.get(generationId) || [];
      waiters.push({ resolve, reject, ref });
      this._cancels.set(generationId, waiters);
      if (!this._send({ type: "cancel", generation_id: generationId, ref })) {
        this._cancels.delete(generationId);
        reject(new ChatError("disconnected", "not connected"));
      }
    });
  }

  history(conversationId, { before, limit } = {}) {
    const frame = { type: "history", conversation_id: conversationId };
    if (before !== undefined && before !== null) frame.before = before;
    if (limit !== undefined && limit !== null) frame.limit = limit;
    return this._request("history", frame);
  }

  ping(ts = Date.now()) {
    return this._request("ping", { type: "ping", ts });
  }

  typing(conversationId) {
    return this._send({ type: "typing", conversation_id: conversationId });
  }

  /** The reply streaming with this generation id, if any. */
  reply(generationId) {
    return this._replies.get(generationId);
  }

  /** Replies streaming now (in a conversation, or all). */
  replies(conversationId) {
    const all = [...this._replies.values()];
    return conversationId ? all.filter((r) => r.conversationId === conversationId) : all;
  }

  // -- frames --------------------------------------------------------------------------

  _frame(f) {
    emit(this, "frame", f);
    switch (f.type) {
      case "hello":
        return this._onHello(f);
      case "joined":
        return this._onJoined(f);
      case "left":
        return this._onLeft(f);
      case "ack":
        return this._onAck(f);
      case "message":
        if (!f.message || typeof f.message.conversation_id !== "string") return undefined;
        this.conversation(f.message.conversation_id).see(f.message.offset);
        return emit(this, "message", f.message);
      case "gen_start":
        return this._onGenStart(f);
      case "delta":
        return this._onDelta(f);
      case "gen_end":
        return this._onGenEnd(f);
      case "typing":
        return emit(this, "typing", f);
      case "presence":
        this.conversation(f.conversation_id).online = f.online;
        return emit(this, "presence", f);
      case "history":
      case "pong":
        return this._answer(f);
      case "reconnect":
        this._reconnectAfterMs = Math.max(0, Number(f.after_ms) || 0);
        return emit(this, "reconnect", f);
      case "error":
        return this._onError(f);
      default:
        return undefined; // a frame type of a newer server: ignored
    }
  }

  _answer(f) {
    const req = typeof f.ref === "string" ? this._requests.get(f.ref) : undefined;
    if (!req) return;
    this._requests.delete(f.ref);
    req.resolve(f);
  }

  _onHello(f) {
    const first = !this.hello;
    this.hello = f;
    this.state = "open";
    this.attempts = 0;
    this.userId = f.user_id;
    this.sessionId = f.session_id;
    this.serverId = f.server_id;
    this._heartbeatS = Number(f.heartbeat_s) || 30;
    this._startHeartbeat();
    // Joins first, each with its `since`; a conversation's waiting sends follow its `joined`.
    const asked = new Set();
    for (const [ref, req] of this._requests) {
      if (req.kind !== "join") continue;
      asked.add(req.conversationId);
      this._sendJoin(this.conversation(req.conversationId), ref);
    }
    for (const c of this._conversations.values()) {
      if (c.wanted && !asked.has(c.id)) this._sendJoin(c, this._ref("j"));
    }
    for (const entry of this._sends.values()) this._transmit(entry);
    emit(this, "open", { hello: f, reconnected: !first });
    if (this._connected) {
      this._connected.resolve(f);
      this._connected = null;
    }
  }

  _onJoined(f) {
    const c = this.conversation(f.conversation_id);
    const recovered = f.recovered === true && c.epoch !== null && c.epoch === f.epoch;
    if (!recovered) {
      // Not a continuation: the window starts again from what the server holds.
      c.lastOffset = Number(f.offset) || 0;
      c.ahead.clear();
    }
    c.epoch = f.epoch;
    const messages = Array.isArray(f.messages) ? f.messages : [];
    for (const m of messages) c.see(m.offset);
    c.joined = true;
    c.wanted = true;
    // Replies of this conversation that ended while we were away: end their streams.
    const live = f.generation || null;
    for (const stream of this.replies(c.id)) {
      if (live && stream.generationId === live.generation_id) continue;
      const stored = messages.find((m) => m.client_msg_id === stream.generationId) || null;
      this._endStream(stream, {
        type: "gen_end",
        conversation_id: c.id,
        generation_id: stream.generationId,
        finish_reason: stored?.finish_reason || "unknown",
        usage: stored?.usage || { input_tokens: 0, output_tokens: 0 },
        message: stored,
        missed: true,
      });
    }
    if (live) {
      let stream = this._replies.get(live.generation_id);
      const created = !stream;
      if (created) {
        stream = new ReplyStream(this, c.id, live.generation_id);
        this._replies.set(live.generation_id, stream);
      }
      stream._snapshot(Number(live.seq) || 0, live.text || "");
      if (created) emit(this, "reply", stream);
    }
    const req = typeof f.ref === "string" ? this._requests.get(f.ref) : undefined;
    if (req) {
      this._requests.delete(f.ref);
      req.resolve(f);
    }
    emit(this, "joined", { frame: f, recovered });
    for (const entry of this._sends.values()) {
      if (entry.conversationId === c.id) this._transmit(entry);
    }
  }

  _onLeft(f) {
    const c = this._conversations.get(f.conversation_id);
    if (c) {
      c.wanted = false;
      c.joined = false;
    }
    this._forgetReplies(f.conversation_id);
    this._answer(f);
    emit(this, "left", f);
  }

  _onAck(f) {
    const entry = this._sends.get(f.client_msg_id);
    if (!entry) return;
    this._sends.delete(f.client_msg_id);
    this.conversation(entry.conversationId).see(f.offset);
    entry.resolve(f);
    emit(this, "ack", { ...f, conversation_id: entry.conversationId, text: entry.text });
  }

  _onGenStart(f) {
    let stream = this._replies.get(f.generation_id);
    if (stream) return;
    stream = new ReplyStream(this, f.conversation_id, f.generation_id, {
      agentId: f.agent_id,
      model: f.model,
      replyTo: f.reply_to,
      thinking: f.thinking === true,
    });
    this._replies.set(f.generation_id, stream);
    emit(this, "reply", stream);
  }

  _onDelta(f) {
    let stream = this._replies.get(f.generation_id);
    if (!stream) {
      // Its gen_start went before we joined (the join's snapshot stood in for it).
      stream = new ReplyStream(this, f.conversation_id, f.generation_id);
      this._replies.set(f.generation_id, stream);
      emit(this, "reply", stream);
    }
    if (stream._take(Number(f.seq), f.text || "")) emit(this, "delta", f);
  }

  _onGenEnd(f) {
    if (f.message) this.conversation(f.conversation_id).see(f.message.offset);
    let stream = this._replies.get(f.generation_id);
    if (!stream) stream = new ReplyStream(this, f.conversation_id, f.generation_id);
    this._endStream(stream, f);
    emit(this, "gen_end", f);
  }

  _endStream(stream, f) {
    this._replies.delete(stream.generationId);
    stream._finish(f);
    const waiters = this._cancels.get(stream.generationId);
    if (waiters) {
      this._cancels.delete(stream.generationId);
      for (const w of waiters) w.resolve(f);
    }
  }

  _onError(f) {
    const ref = typeof f.ref === "string" ? f.ref : null;
    const error = ChatError.of(f);
    if (ref) {
      for (const [id, entry] of this._sends) {
        if (entry.ref === ref) {
          this._sends.delete(id);
          entry.reject(error);
          return;
        }
      }
      for (const [gid, waiters] of this._cancels) {
        const index = waiters.findIndex((w) => w.ref === ref);
        if (index < 0) continue;
        const [w] = waiters.splice(index, 1);
        if (!waiters.length) this._cancels.delete(gid);
        // not_found: the reply ended before the cancel arrived, which is what was asked.
        if (f.code === "not_found") w.resolve(null);
        else w.reject(error);
        return;
      }
      const req = this._requests.get(ref);
      if (req) {
        this._requests.delete(ref);
        if (req.kind === "join") {
          const c = this._conversations.get(req.conversationId);
          if (c) c.wanted = false;
        }
        req.reject(error);
        return;
      }
    }
    emit(this, "error", error);
  }
}
