-- Transactional outbox of the service owning this schema (see services/common/outbox.py).
-- Rows are written in the same transaction as the change they announce; the relay moves
-- them to the Redis stream spaces:events:<service> and deletes them.
CREATE TABLE outbox (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     uuid        NOT NULL,
    event_type   text        NOT NULL,
    event_key    text        NOT NULL,
    payload_type text        NOT NULL,
    payload      bytea       NOT NULL,
    traceparent  text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- Position in the stream, given by the relay in the order rows became visible. NULL
    -- until then. The stream entry id is "<relay_seq>-1".
    relay_seq    bigint UNIQUE
);

CREATE INDEX outbox_unsequenced ON outbox (id) WHERE relay_seq IS NULL;

-- The last relay_seq handed out; one row. Kept apart from the outbox so that deleting
-- relayed rows never lets a sequence number be reused.
CREATE TABLE outbox_relay_state (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_seq  bigint  NOT NULL
);
INSERT INTO outbox_relay_state (last_seq) VALUES (0);
