-- Notify: inbox, preferences, fan-out jobs, reminders, webhooks, devices and deliveries.

-- Events already applied, by event id. A handler inserts here in the same transaction as
-- its effect, so an event delivered twice (stream redelivery, two replicas) counts once.
CREATE TABLE processed_events (
    event_id     uuid PRIMARY KEY,
    event_type   text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX processed_events_by_time ON processed_events (processed_at);

-- The inbox. ids come from a sequence: a million-row fan-out cannot afford minting ids in
-- Python, and a bigint orders newest-first as well as a time-ordered id would. No CACHE:
-- cached ranges per connection would break the newest-first order across connections.
CREATE SEQUENCE notification_ids AS bigint;
CREATE TABLE notifications (
    user_id     text        NOT NULL,
    id          bigint      NOT NULL DEFAULT nextval('notification_ids'),
    kind        smallint    NOT NULL,
    title       text        NOT NULL,
    body        text        NOT NULL DEFAULT '',
    actor       text        NOT NULL DEFAULT '',
    space       text        NOT NULL DEFAULT '',
    subject     text        NOT NULL DEFAULT '',
    -- What makes two notifications "the same" for one user (e.g. started:<space>), so a
    -- replayed batch or a duplicated event cannot notify twice.
    dedupe_key  text        NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    read        boolean     NOT NULL DEFAULT false,
    -- (user, id) serves the inbox page, mark-read by name and the unread count.
    PRIMARY KEY (user_id, id)
);
ALTER SEQUENCE notification_ids OWNED BY notifications.id;
CREATE UNIQUE INDEX notifications_dedupe ON notifications (user_id, dedupe_key);

-- Preferences; a user without a row has the defaults (everything on, nobody muted).
CREATE TABLE preferences (
    user_id             text        PRIMARY KEY,
    disabled_kinds      smallint[]  NOT NULL DEFAULT '{}',
    push_disabled_kinds smallint[]  NOT NULL DEFAULT '{}',
    -- Muted users by id (not name), compared with a notification's actor id.
    muted_actors        text[]      NOT NULL DEFAULT '{}',
    version             bigint      NOT NULL DEFAULT 0,
    update_time         timestamptz
);

-- identity's blocks, mirrored from its events: never notify across a block.
CREATE TABLE blocks (
    blocker_id text NOT NULL,
    blocked_id text NOT NULL,
    PRIMARY KEY (blocker_id, blocked_id)
);
CREATE INDEX blocks_by_blocked ON blocks (blocked_id);

-- What notify knows about Spaces from rooms' events (titles and hosts for reminders and
-- recordings).
CREATE TABLE spaces (
    space_id             text PRIMARY KEY,
    host_id              text NOT NULL,
    title                text NOT NULL DEFAULT '',
    scheduled_start_time timestamptz
);

-- Ticket holders, from payments' events (recording and cancellation notices).
CREATE TABLE ticket_holders (
    space_id text NOT NULL,
    user_id  text NOT NULL,
    ticket   text NOT NULL,
    PRIMARY KEY (space_id, ticket)
);

-- A follower fan-out in progress: cursor is identity's StreamFollowerIds cursor after the
-- last batch written, advanced in the same transaction as that batch.
CREATE TABLE fanout_jobs (
    id          uuid        PRIMARY KEY,
    kind        smallint    NOT NULL,
    host_id     text        NOT NULL,
    space_id    text        NOT NULL,
    title       text        NOT NULL,
    body        text        NOT NULL DEFAULT '',
    visibility  smallint    NOT NULL,
    dedupe_key  text        NOT NULL,
    cursor      text        NOT NULL DEFAULT '',
    -- 1 pending, 2 done, 3 canceled.
    state       smallint    NOT NULL DEFAULT 1,
    created     bigint      NOT NULL DEFAULT 0,
    batches     bigint      NOT NULL DEFAULT 0,
    lease_owner text,
    lease_until timestamptz,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    finish_time timestamptz
);
CREATE INDEX fanout_jobs_pending ON fanout_jobs (update_time) WHERE state = 1;

-- At most one reminder per (Space, user). state: 1 scheduled, 2 sent, 3 canceled.
CREATE TABLE reminders (
    space_id    text        NOT NULL,
    user_id     text        NOT NULL,
    kind        smallint    NOT NULL,
    fire_time   timestamptz NOT NULL,
    state       smallint    NOT NULL DEFAULT 1,
    sent_time   timestamptz,
    update_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (space_id, user_id)
);
CREATE INDEX reminders_due ON reminders (fire_time) WHERE state = 1;

CREATE TABLE webhooks (
    id                  text        PRIMARY KEY,
    user_id             text        NOT NULL,
    url                 text        NOT NULL,
    kinds               smallint[]  NOT NULL DEFAULT '{}',
    secret              text        NOT NULL,
    -- 1 active, 2 disabled.
    state               smallint    NOT NULL DEFAULT 1,
    request_id          uuid,
    request_fingerprint text,
    create_time         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhooks_by_user ON webhooks (user_id, create_time, id);
CREATE UNIQUE INDEX webhooks_request ON webhooks (user_id, request_id);

CREATE TABLE devices (
    id           text        PRIMARY KEY,
    user_id      text        NOT NULL,
    platform     smallint    NOT NULL,
    token        text        NOT NULL,
    create_time  timestamptz NOT NULL DEFAULT now(),
    refresh_time timestamptz NOT NULL DEFAULT now(),
    UNIQUE (platform, token)
);
CREATE INDEX devices_by_user ON devices (user_id);

-- One notification's delivery to one webhook (channel 1) or device (channel 2).
-- state: 1 pending, 2 retrying, 3 succeeded, 4 dead-lettered.
CREATE TABLE deliveries (
    id                bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel           smallint    NOT NULL,
    target_id         text        NOT NULL,
    user_id           text        NOT NULL,
    notification_id   bigint      NOT NULL,
    kind              smallint    NOT NULL,
    state             smallint    NOT NULL DEFAULT 1,
    attempt_count     integer     NOT NULL DEFAULT 0,
    last_status_code  integer     NOT NULL DEFAULT 0,
    last_error        text        NOT NULL DEFAULT '',
    create_time       timestamptz NOT NULL DEFAULT now(),
    last_attempt_time timestamptz,
    next_attempt_time timestamptz NOT NULL DEFAULT now(),
    UNIQUE (channel, target_id, notification_id)
);
CREATE INDEX deliveries_due ON deliveries (next_attempt_time) WHERE state IN (1, 2);
CREATE INDEX deliveries_by_target ON deliveries (channel, target_id, id DESC);
