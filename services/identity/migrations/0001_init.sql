-- Identity: accounts, credentials, the follow graph, blocks, refresh tokens, signing keys.

-- Ids are opaque ASCII: COLLATE "C" compares them as bytes, which is their natural (and
-- time) order and several times cheaper than a locale's rules in every index below.
CREATE TABLE users (
    id              text COLLATE "C" PRIMARY KEY,
    handle          text NOT NULL,
    -- Handles are unique ignoring case; the original spelling is kept for display.
    handle_key      text COLLATE "C" NOT NULL CONSTRAINT users_handle_key_unique UNIQUE,
    display_name    text NOT NULL,
    bio             text NOT NULL DEFAULT '',
    avatar_uri      text NOT NULL DEFAULT '',
    password_hash   text NOT NULL,
    -- Kept in step with the follows table in the same transaction as each edge change.
    follower_count  bigint NOT NULL DEFAULT 0 CHECK (follower_count >= 0),
    following_count bigint NOT NULL DEFAULT 0 CHECK (following_count >= 0),
    create_time     timestamptz NOT NULL,
    update_time     timestamptz NOT NULL
);

-- CreateUser's idempotency keys. The fingerprint covers the profile fields; a replay must
-- also present the same password, checked against the account's hash.
CREATE TABLE create_requests (
    request_id  uuid PRIMARY KEY,
    fingerprint bytea NOT NULL,
    user_id     text COLLATE "C" NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    create_time timestamptz NOT NULL
);
CREATE INDEX create_requests_by_time ON create_requests (create_time);

-- One row per edge. seq orders edges by when they were made (a re-follow gets a new one),
-- which is the order of every list and stream, paged by keyset on the two indexes below.
-- INCLUDE makes those scans index-only: the million-follower stream never touches the
-- heap once the table is vacuumed.
CREATE TABLE follows (
    seq         bigint GENERATED ALWAYS AS IDENTITY,
    followee_id text COLLATE "C" NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    follower_id text COLLATE "C" NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (followee_id, follower_id),
    CHECK (followee_id <> follower_id)
);
CREATE INDEX follows_followers ON follows (followee_id, seq) INCLUDE (follower_id);
CREATE INDEX follows_following ON follows (follower_id, seq) INCLUDE (followee_id);

CREATE TABLE blocks (
    seq         bigint GENERATED ALWAYS AS IDENTITY,
    blocker_id  text COLLATE "C" NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    blocked_id  text COLLATE "C" NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (blocker_id, blocked_id),
    CHECK (blocker_id <> blocked_id)
);
CREATE INDEX blocks_by_blocker ON blocks (blocker_id, seq) INCLUDE (blocked_id);
CREATE INDEX blocks_by_blocked ON blocks (blocked_id, blocker_id);

-- Refresh tokens are stored as SHA-256 hashes. A family starts at log-in; each refresh
-- spends one token and adds the next (same family, same expiry); reuse of a spent token
-- revokes the family.
CREATE TABLE refresh_tokens (
    token_hash  bytea PRIMARY KEY,
    family_id   uuid NOT NULL,
    user_id     text COLLATE "C" NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    issue_time  timestamptz NOT NULL,
    expire_time timestamptz NOT NULL,
    spent_time  timestamptz,
    revoke_time timestamptz
);
CREATE INDEX refresh_tokens_by_family ON refresh_tokens (family_id);
CREATE INDEX refresh_tokens_by_expiry ON refresh_tokens (expire_time);

-- Token signing keys (see services/identity/keys.py): the signer is the key activated
-- most recently; keys are published from creation until their tokens have expired.
CREATE TABLE signing_keys (
    kid           text PRIMARY KEY,
    -- PKCS#8 PEM, encrypted when IDENTITY_KEY_ENCRYPTION_SECRET is set.
    private_pem   bytea NOT NULL,
    create_time   timestamptz NOT NULL,
    activate_time timestamptz NOT NULL
);
