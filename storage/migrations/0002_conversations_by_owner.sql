-- Conversations a user owns, counted at every creation against the tier's cap.
CREATE INDEX conversations_by_owner ON conversations (owner_id);
