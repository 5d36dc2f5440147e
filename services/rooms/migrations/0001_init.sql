-- Rooms: Spaces, their participants and everything moderators and users attach to them.
-- Enum columns hold the proto enum values (SpaceState, ParticipantRole, ...).

CREATE TABLE spaces (
    id                   text        PRIMARY KEY,
    host_id              text        NOT NULL,
    title                text        NOT NULL,
    topics               text[]      NOT NULL DEFAULT '{}',
    state                smallint    NOT NULL,
    visibility           smallint    NOT NULL,
    speak_permission     smallint    NOT NULL,
    ticketed             boolean     NOT NULL DEFAULT false,
    recording            boolean     NOT NULL DEFAULT false,
    scheduled_start_time timestamptz,
    start_time           timestamptz,
    end_time             timestamptz,
    end_reason           smallint    NOT NULL DEFAULT 0,
    create_time          timestamptz NOT NULL,
    update_time          timestamptz NOT NULL,
    pinned_text          text,
    pinned_uri           text,
    pinned_by            text,
    pin_time             timestamptz,
    captions_available   boolean     NOT NULL DEFAULT false,
    recording_state      smallint    NOT NULL DEFAULT 0,
    origin_node          text        NOT NULL DEFAULT '',
    -- Since when the live Space's host has had no media connection; NULL while connected.
    -- The sweeper ends Spaces where this is older than the host-absence grace.
    host_absent_since    timestamptz,
    -- Bumped on every change of a shared field; the etag is derived from it.
    version              bigint      NOT NULL DEFAULT 1
);

-- A host has at most one live Space: the database enforces it against racing creates.
CREATE UNIQUE INDEX spaces_one_live_per_host ON spaces (host_id) WHERE state = 2;
CREATE INDEX spaces_by_host ON spaces (host_id, state);
CREATE INDEX spaces_live ON spaces (start_time DESC) WHERE state = 2;
CREATE INDEX spaces_scheduled ON spaces (scheduled_start_time) WHERE state = 1;
CREATE INDEX spaces_host_absent ON spaces (host_absent_since)
    WHERE state = 2 AND host_absent_since IS NOT NULL;

-- One row per user who ever joined a Space; "active" is whether they are in it now. Rows
-- stay after a leave so the media revision keeps increasing across rejoins and reports
-- can name people who were there.
CREATE TABLE participants (
    space_id           text        NOT NULL REFERENCES spaces (id),
    user_id            text        NOT NULL,
    role               smallint    NOT NULL,
    active             boolean     NOT NULL DEFAULT true,
    muted              boolean     NOT NULL DEFAULT true,
    hand_raise_time    timestamptz,
    captions_enabled   boolean     NOT NULL DEFAULT false,
    join_time          timestamptz NOT NULL,
    role_time          timestamptz,
    invitation_kind    smallint    NOT NULL DEFAULT 0,
    inviter_id         text,
    invitation_time    timestamptz,
    connected          boolean     NOT NULL DEFAULT false,
    media_session      text        NOT NULL DEFAULT '',
    session_time       timestamptz,
    disconnected_since timestamptz,
    revision           bigint      NOT NULL DEFAULT 1,
    PRIMARY KEY (space_id, user_id)
);

CREATE INDEX participants_active ON participants (space_id, role, join_time) WHERE active;
CREATE INDEX participants_hands ON participants (space_id, hand_raise_time)
    WHERE active AND hand_raise_time IS NOT NULL;
CREATE INDEX participants_by_user ON participants (user_id) WHERE active;
CREATE INDEX participants_disconnected ON participants (disconnected_since)
    WHERE active AND disconnected_since IS NOT NULL;

-- Users a moderator removed with block_from_space.
CREATE TABLE space_bans (
    space_id    text        NOT NULL REFERENCES spaces (id),
    user_id     text        NOT NULL,
    banned_by   text        NOT NULL,
    create_time timestamptz NOT NULL,
    PRIMARY KEY (space_id, user_id)
);

-- The invite list (InviteUsers).
CREATE TABLE space_invites (
    space_id    text        NOT NULL REFERENCES spaces (id),
    user_id     text        NOT NULL,
    inviter_id  text        NOT NULL,
    create_time timestamptz NOT NULL,
    PRIMARY KEY (space_id, user_id)
);

CREATE TABLE reminders (
    space_id    text        NOT NULL REFERENCES spaces (id),
    user_id     text        NOT NULL,
    create_time timestamptz NOT NULL,
    PRIMARY KEY (space_id, user_id)
);

-- Reports keep the context reviewers need: who was on stage and speaking at the time.
CREATE TABLE reports (
    id             text        PRIMARY KEY,
    space_id       text        NOT NULL REFERENCES spaces (id),
    reporter_id    text        NOT NULL,
    target_user_id text        NOT NULL DEFAULT '',
    reason         smallint    NOT NULL,
    note           text        NOT NULL DEFAULT '',
    context        jsonb       NOT NULL DEFAULT '{}',
    create_time    timestamptz NOT NULL,
    UNIQUE (space_id, reporter_id, target_user_id, reason)
);

-- Idempotency keys of CreateSpace and JoinSpace with the first response.
CREATE TABLE idempotency_keys (
    user_id     text        NOT NULL,
    method      text        NOT NULL,
    request_id  text        NOT NULL,
    fingerprint bytea       NOT NULL,
    response    bytea,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, method, request_id)
);
CREATE INDEX idempotency_keys_age ON idempotency_keys (create_time);
