// Types of chatclient.js, the browser module of chatserver's wire protocol v1
// (docs/protocol.md, "The browser module"; the frames are those of the protocol).

export declare const SUBPROTOCOL: "chat.v1.json";
export declare const PROTOCOL_VERSION: 1;

export type Role = "user" | "assistant" | "system";
export type FinishReason = "stop" | "length" | "cancelled" | "safety" | "error";
export type ErrorCode =
  | "bad_frame"
  | "unknown_type"
  | "unauthorized"
  | "forbidden"
  | "not_found"
  | "rate_limited"
  | "quota_exceeded"
  | "too_large"
  | "unavailable"
  | "internal";

export interface Usage {
  input_tokens: number;
  output_tokens: number;
}

export interface Message {
  id: string;
  conversation_id: string;
  offset: number;
  role: Role;
  text: string;
  created_at: string;
  user_id?: string;
  client_msg_id?: string;
  agent_id?: string;
  finish_reason?: FinishReason;
  model?: string;
  reply_to?: string;
  usage?: Usage;
}

export interface Since {
  offset: number;
  epoch: string;
}

export interface HelloFrame {
  type: "hello";
  session_id: string;
  user_id: string;
  server_id: string;
  heartbeat_s: number;
  max_frame_bytes: number;
  protocol: number;
  ref?: string;
}

export interface JoinedFrame {
  type: "joined";
  conversation_id: string;
  epoch: string;
  offset: number;
  recovered: boolean;
  messages: Message[];
  generation?: { generation_id: string; seq: number; text: string };
  ref?: string;
}

export interface LeftFrame {
  type: "left";
  conversation_id: string;
  ref?: string;
}

export interface AckFrame {
  type: "ack";
  client_msg_id: string;
  message_id: string;
  offset: number;
  created_at: string;
  duplicate: boolean;
  ref?: string;
}

export interface GenStartFrame {
  type: "gen_start";
  conversation_id: string;
  generation_id: string;
  reply_to: string;
  agent_id: string;
  model: string;
  /** The model may think before it writes: show "thinking…" until the first delta. */
  thinking?: true;
}

export interface DeltaFrame {
  type: "delta";
  conversation_id: string;
  generation_id: string;
  seq: number;
  text: string;
}

export interface GenEndFrame {
  type: "gen_end";
  conversation_id: string;
  generation_id: string;
  /** "unknown" only for a reply that ended while the client was away and is not in `joined`. */
  finish_reason: FinishReason | "unknown";
  usage: Usage;
  message: Message | null;
  error?: string;
  /** Why an `error` end happened, where the server knows (a client treats others as plain). */
  error_code?: "model_rate_limited" | "model_unavailable" | "model_rejected" | string;
  retry_after_ms?: number;
  thinking_tokens?: number;
  /** Set by the module (not the server): the reply ended while the client was away. */
  missed?: true;
}

export interface TypingFrame {
  type: "typing";
  conversation_id: string;
  user_id: string;
}

export interface PresenceFrame {
  type: "presence";
  conversation_id: string;
  /** Members with a connection joined to the conversation, on any instance; sorted. */
  online: string[];
}

export interface HistoryFrame {
  type: "history";
  conversation_id: string;
  messages: Message[];
  has_more: boolean;
  ref?: string;
}

export interface PongFrame {
  type: "pong";
  ts: number | string | null;
  ref?: string;
}

export interface ReconnectFrame {
  type: "reconnect";
  reason: string;
  after_ms: number;
}

export interface ErrorFrame {
  type: "error";
  code: ErrorCode;
  message: string;
  retry_after_ms?: number;
  ref?: string;
}

export type ServerFrame =
  | HelloFrame
  | JoinedFrame
  | LeftFrame
  | AckFrame
  | { type: "message"; message: Message }
  | GenStartFrame
  | DeltaFrame
  | GenEndFrame
  | TypingFrame
  | PresenceFrame
  | HistoryFrame
  | PongFrame
  | ReconnectFrame
  | ErrorFrame;

/** An `error` answer to one of the client's frames, or a request cut off ("disconnected",
 * "closed"). */
export declare class ChatError extends Error {
  readonly code: ErrorCode | "disconnected" | "closed";
  /** When to try again (rate_limited, quota_exceeded, unavailable), in milliseconds. */
  readonly retryAfterMs: number | null;
  readonly ref: string | null;
  readonly frame: ErrorFrame | null;
  static of(frame: ErrorFrame): ChatError;
}

export interface ReplyDelta {
  seq: number;
  /** The whole text so far. */
  text: string;
  /** What this step added. */
  delta: string;
}

interface ReplyStreamEventMap {
  delta: CustomEvent<ReplyDelta>;
  end: CustomEvent<GenEndFrame>;
}

/** One agent reply as it streams, from gen_start (or a join's snapshot) to gen_end. */
export declare class ReplyStream extends EventTarget {
  readonly conversationId: string;
  readonly generationId: string;
  readonly agentId: string | null;
  readonly model: string | null;
  readonly replyTo: string | null;
  /** gen_start said the model may think first (a stream from a join's snapshot: false). */
  readonly thinking: boolean;
  readonly seq: number;
  readonly text: string;
  readonly end: GenEndFrame | null;
  readonly ended: boolean;
  readonly done: Promise<GenEndFrame>;
  cancel(): Promise<GenEndFrame | null>;
  addEventListener<K extends keyof ReplyStreamEventMap>(
    type: K,
    listener: (event: ReplyStreamEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void;
}

export interface ChatClientOptions {
  /** ws:// or wss:// URL of /ws; default: /ws of the page's own origin. */
  url?: string;
  /** The JWT, or a function asked before every connection (a fresh token after 4401). */
  token: string | (() => string | Promise<string>);
  /** Reconnect delays: capped exponential with jitter (defaults 500 ms, 15 s). */
  backoff?: { baseMs?: number; maxMs?: number };
  /** Application pings every heartbeat_s, and a reconnect when nothing came for twice that. */
  heartbeat?: boolean;
  /** A WebSocket constructor (default: the browser's). */
  WebSocket?: typeof WebSocket;
}

interface ChatClientEventMap {
  open: CustomEvent<{ hello: HelloFrame; reconnected: boolean }>;
  close: CustomEvent<{ code: number; reason: string; wasOpen: boolean }>;
  reconnecting: CustomEvent<{
    delayMs: number;
    attempt: number;
    code: number;
    /** "server": the delay a `reconnect` frame asked for; "backoff": the client's own. */
    reason: "server" | "backoff";
  }>;
  reconnect: CustomEvent<ReconnectFrame>;
  fatal: CustomEvent<{ code: number; message: string }>;
  joined: CustomEvent<{ frame: JoinedFrame; recovered: boolean }>;
  left: CustomEvent<LeftFrame>;
  ack: CustomEvent<AckFrame & { conversation_id: string; text: string }>;
  message: CustomEvent<Message>;
  reply: CustomEvent<ReplyStream>;
  delta: CustomEvent<DeltaFrame>;
  gen_end: CustomEvent<GenEndFrame>;
  typing: CustomEvent<TypingFrame>;
  presence: CustomEvent<PresenceFrame>;
  /** An error frame that answers none of the client's waiting requests. */
  error: CustomEvent<ChatError>;
  /** Every frame received, first. */
  frame: CustomEvent<ServerFrame>;
}

export declare function backoffDelay(
  attempt: number,
  options?: { baseMs?: number; maxMs?: number },
  random?: () => number,
): number;

export declare class ChatClient extends EventTarget {
  constructor(options: ChatClientOptions);
  static defaultUrl(): string;
  readonly url: string;
  readonly state: "idle" | "connecting" | "open" | "closed";
  readonly connected: boolean;
  readonly userId: string | null;
  readonly sessionId: string | null;
  readonly serverId: string | null;
  readonly hello?: HelloFrame;
  /** Reconnect attempts since the last `hello`. */
  readonly attempts: number;
  /** Sends not acked yet (sent again after a reconnect). */
  readonly unacked: { clientMsgId: string; conversationId: string; text: string }[];

  /** Open, and keep open (reconnecting with backoff); resolves with the first `hello`. */
  connect(): Promise<HelloFrame>;
  /** Close for good; waiting requests are rejected with ChatError "closed". */
  close(code?: number, reason?: string): void;
  /** While waiting to reconnect: try now. */
  reconnectNow(): void;

  /** Join, and stay joined across reconnects (rejoined with `since`). */
  join(conversationId: string, options?: { since?: Since | null }): Promise<JoinedFrame>;
  leave(conversationId: string): Promise<LeftFrame>;
  /** Where a rejoin resumes: the epoch and the highest offset seen without a gap. */
  since(conversationId: string): Since | null;
  /** Resolves with the ack; kept and resent (same client_msg_id) across reconnects until
   * acked; rejects with the ChatError of a refusal. */
  send(conversationId: string, text: string, options?: { clientMsgId?: string }): Promise<AckFrame>;
  /** Resolves when the reply ended (null: it was over before the cancel arrived). */
  cancel(generationId: string): Promise<GenEndFrame | null>;
  history(
    conversationId: string,
    options?: { before?: number | null; limit?: number | null },
  ): Promise<HistoryFrame>;
  ping(ts?: number | string): Promise<PongFrame>;
  /** false when not connected (typing notices are not kept). */
  typing(conversationId: string): boolean;
  reply(generationId: string): ReplyStream | undefined;
  replies(conversationId?: string): ReplyStream[];

  addEventListener<K extends keyof ChatClientEventMap>(
    type: K,
    listener: (event: ChatClientEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void;
}

/** A random UUID (v4), also outside a secure context (where crypto.randomUUID is missing). */
export function randomId(): string;
