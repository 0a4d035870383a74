-- 0001: the initial schema (docs/architecture.md, "Postgres").
-- Ids are text: the server makes UUIDs, but the store keeps whatever ids it is given.
-- Timestamps are timestamptz; the protocol's RFC 3339 millisecond strings round-trip exactly.
-- No foreign keys from messages or conversations: the batch writer must never be blocked by
-- a row it cannot insert (a poison batch would stop persistence for everyone).

CREATE TABLE users (
    id text PRIMARY KEY,
    email text,
    role text NOT NULL DEFAULT 'user',
    tier text NOT NULL DEFAULT 'free',
    is_active boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX users_by_email ON users (email, is_active);
CREATE INDEX users_by_role ON users (role, is_active);

-- Agents are configured in TOML; this table lets reports join usage and conversations to them.
CREATE TABLE agents (
    id text PRIMARY KEY,
    name text NOT NULL,
    model text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE conversations (
    id text PRIMARY KEY,
    agent_id text NOT NULL,
    title text NOT NULL,
    owner_id text NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
) WITH (fillfactor = 70);  -- updated_at moves with every batch: room for HOT updates
CREATE INDEX conversations_by_agent ON conversations (agent_id, created_at);

-- One row per member (the owner included). updated_at is a copy of the conversation's, kept
-- by the batch writer in the same statement, so "my conversations, latest first" is one range
-- scan of members_by_user: the (user, updated_at) index of the product plan.
CREATE TABLE conversation_members (
    conversation_id text NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    user_id text NOT NULL,
    position integer NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
) WITH (fillfactor = 70);
CREATE INDEX members_by_user ON conversation_members (user_id, updated_at DESC, conversation_id DESC);

-- Partitioned by month on created_at; the monthly partitions are created by the server
-- (storage/store/pg_partitions.py), the default one catches anything outside them.
-- The primary key holds the partition key: a replayed message has the same conversation,
-- offset and created_at (all three come from the outbox entry), so it conflicts and is skipped.
CREATE TABLE messages (
    conversation_id text NOT NULL,
    "offset" bigint NOT NULL,
    created_at timestamptz NOT NULL,
    id text NOT NULL,
    role text NOT NULL,
    text text NOT NULL,
    -- Postgres text cannot hold U+0000: such a text is kept here as UTF-8, exactly, and
    -- `text` holds it with U+FFFD in place of each NUL (readable, searchable).
    text_raw bytea,
    user_id text,
    agent_id text,
    client_msg_id text,
    finish_reason text,
    input_tokens integer,
    output_tokens integer,
    model text,
    reply_to text,
    PRIMARY KEY (conversation_id, "offset", created_at)
) PARTITION BY RANGE (created_at);
CREATE INDEX messages_by_time ON messages (conversation_id, created_at DESC);
CREATE INDEX messages_by_client_msg_id ON messages (conversation_id, client_msg_id)
    WHERE client_msg_id IS NOT NULL;
CREATE TABLE messages_default PARTITION OF messages DEFAULT;

-- Tokens per user per UTC day, charged to the user whose message the reply answered.
CREATE TABLE usage (
    user_id text NOT NULL,
    day date NOT NULL,
    input_tokens bigint NOT NULL DEFAULT 0,
    output_tokens bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, day)
) WITH (fillfactor = 70);  -- updated in place by every batch with replies
