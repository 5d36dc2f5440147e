-- The ordered, durable log of every Space's live events (services/rooms/live).
--
-- space_event_counters holds the last sequence number handed out per Space. Appending an
-- event increments it inside the writer's transaction; the row lock this takes serializes
-- the writers of one Space across every rooms replica until they commit, so sequence order
-- is commit order and a committed event never has an uncommitted predecessor. Counter rows
-- are never deleted: a Space's sequence must not restart.
CREATE TABLE space_event_counters (
    space_id text   PRIMARY KEY,
    last_seq bigint NOT NULL CHECK (last_seq > 0)
);

-- One row per event. body is the serialized SpaceEvent without its sequence, resume_token
-- and event_time (those are rebuilt from the columns). ephemeral marks reactions and
-- speaking levels, which are kept for live gap repair but never replayed on resume.
-- Rows older than the retention period (ROOMS_LIVE_RETENTION_S) are pruned.
CREATE TABLE space_events (
    space_id   text        NOT NULL,
    seq        bigint      NOT NULL,
    body       bytea       NOT NULL,
    event_time timestamptz NOT NULL,
    ephemeral  boolean     NOT NULL DEFAULT false,
    PRIMARY KEY (space_id, seq)
);

CREATE INDEX space_events_event_time_idx ON space_events (event_time);
