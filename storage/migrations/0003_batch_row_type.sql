-- One row of a small batch write: a message's columns, then the user its usage is charged
-- to (when the batch knows). A batch goes to Postgres as one array of these: asyncpg encodes
-- it in about half the time of one array per column, whose every element it first tests
-- against Python's abstract collection types.
CREATE TYPE message_batch_row AS (
    conversation_id text,
    "offset" bigint,
    created_at timestamptz,
    id text,
    role text,
    text text,
    text_raw bytea,
    user_id text,
    agent_id text,
    client_msg_id text,
    finish_reason text,
    input_tokens integer,
    output_tokens integer,
    model text,
    reply_to text,
    charge_to text
);
