-- Payments: the Space projection, ticket offerings, tickets, tips, the double-entry ledger,
-- payouts, idempotency keys, and the sandbox processor's own state (sandbox_*).
-- Every amount is a bigint count of minor units; there is no floating point anywhere.

-- What payments knows of rooms' Spaces, built only from rooms' events (never its tables).
-- state moves forward only: scheduled -> live -> ended, or scheduled -> canceled.
CREATE TABLE spaces (
    id                   text PRIMARY KEY,
    host_id              text NOT NULL,
    state                text NOT NULL CHECK (state IN ('scheduled', 'live', 'ended', 'canceled')),
    scheduled_start_time timestamptz,
    update_time          timestamptz NOT NULL DEFAULT now()
);

-- Rooms events already applied (exactly-once effect of an at-least-once stream).
CREATE TABLE processed_events (
    event_id     uuid PRIMARY KEY,
    event_type   text NOT NULL,
    process_time timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ticket_offerings (
    space_id       text PRIMARY KEY,
    host_id        text NOT NULL,
    price_minor    bigint NOT NULL CHECK (price_minor > 0),
    currency_code  text NOT NULL CHECK (currency_code ~ '^[A-Z]{3}$'),
    capacity       integer NOT NULL CHECK (capacity > 0),
    -- Paid and not refunded.
    sold_count     integer NOT NULL DEFAULT 0 CHECK (sold_count >= 0),
    -- Seats held by purchases whose charge is in flight. Counting them against capacity is
    -- what makes overselling impossible: a seat is taken before the card is charged.
    reserved_count integer NOT NULL DEFAULT 0 CHECK (reserved_count >= 0),
    -- NULL: sales end at the Space's scheduled start.
    sales_end_time timestamptz,
    state          text NOT NULL CHECK (state IN ('on_sale', 'sales_closed', 'canceled', 'settled')),
    create_time    timestamptz NOT NULL,
    update_time    timestamptz NOT NULL,
    CONSTRAINT never_oversold CHECK (sold_count + reserved_count <= capacity)
);

-- state 'reserved' is internal (a seat held while the charge is in flight) and never shown.
CREATE TABLE tickets (
    id                text PRIMARY KEY,
    space_id          text NOT NULL REFERENCES ticket_offerings (space_id),
    owner_id          text NOT NULL,
    host_id           text NOT NULL,
    price_minor       bigint NOT NULL CHECK (price_minor > 0),
    fee_minor         bigint NOT NULL CHECK (fee_minor >= 0),
    currency_code     text NOT NULL,
    state             text NOT NULL
                      CHECK (state IN ('reserved', 'paid', 'refund_pending', 'refunded')),
    refund_reason     text,
    refund_note       text NOT NULL DEFAULT '',
    -- The purchase's idempotency key (scope = buyer), and the processor's key derived from it.
    request_scope     text NOT NULL,
    request_id        uuid NOT NULL,
    processor_key     text NOT NULL UNIQUE,
    charge_id         text,
    -- Set when the Space's revenue (including this ticket) moved from held to available.
    settled           boolean NOT NULL DEFAULT false,
    create_time       timestamptz NOT NULL,
    refund_time       timestamptz,
    UNIQUE (request_scope, request_id)
);
-- One valid (or in-flight) ticket per user per Space.
CREATE UNIQUE INDEX tickets_one_per_user ON tickets (space_id, owner_id)
    WHERE state IN ('reserved', 'paid');
CREATE INDEX tickets_by_space ON tickets (space_id, id);
CREATE INDEX tickets_by_owner ON tickets (owner_id, id);
CREATE INDEX tickets_reserved ON tickets (create_time) WHERE state = 'reserved';
CREATE INDEX tickets_refund_pending ON tickets (space_id) WHERE state = 'refund_pending';

CREATE TABLE tips (
    id            text PRIMARY KEY,
    space_id      text NOT NULL,
    sender_id     text NOT NULL,
    recipient_id  text NOT NULL,
    amount_minor  bigint NOT NULL CHECK (amount_minor > 0),
    fee_minor     bigint NOT NULL CHECK (fee_minor >= 0),
    currency_code text NOT NULL,
    message       text NOT NULL DEFAULT '',
    -- 'pending' is internal: recorded before the card is charged, so a charge whose
    -- answer was lost (or whose request crashed) is always found and finished.
    state         text NOT NULL CHECK (state IN ('pending', 'paid')),
    request_scope text NOT NULL,
    request_id    uuid NOT NULL,
    processor_key text NOT NULL UNIQUE,
    charge_id     text,
    settled       boolean NOT NULL DEFAULT false,
    create_time   timestamptz NOT NULL,
    UNIQUE (request_scope, request_id)
);
CREATE INDEX tips_by_space ON tips (space_id) WHERE NOT settled AND state = 'paid';
CREATE INDEX tips_pending ON tips (create_time) WHERE state = 'pending';

-- One row per settled Space: SettleSpaceRevenue returns it again on repeats.
CREATE TABLE settlements (
    space_id    text PRIMARY KEY,
    amounts     jsonb NOT NULL,
    settle_time timestamptz NOT NULL
);

CREATE TABLE payouts (
    id             text PRIMARY KEY,
    user_id        text NOT NULL,
    amount_minor   bigint NOT NULL CHECK (amount_minor > 0),
    currency_code  text NOT NULL,
    state          text NOT NULL CHECK (state IN ('pending', 'paid', 'failed')),
    failure_reason text NOT NULL DEFAULT '',
    request_id     uuid NOT NULL,
    create_time    timestamptz NOT NULL,
    complete_time  timestamptz,
    UNIQUE (user_id, request_id)
);
CREATE INDEX payouts_by_user ON payouts (user_id, id);
CREATE INDEX payouts_pending ON payouts (create_time) WHERE state = 'pending';

-- Idempotency keys of money-moving writes, scoped to the caller, kept at least 24 hours.
-- A row is 'pending' while its request runs (lease_until fences concurrent repeats) and
-- 'done' once the outcome is final: response holds the serialized answer, or error_* the
-- refusal, both returned verbatim to repeats.
CREATE TABLE idempotency_keys (
    scope         text NOT NULL,
    request_id    uuid NOT NULL,
    operation     text NOT NULL,
    fingerprint   bytea NOT NULL,
    state         text NOT NULL CHECK (state IN ('pending', 'done')),
    lease_until   timestamptz NOT NULL,
    response      bytea,
    error_code    text,
    error_reason  text,
    error_message text,
    create_time   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, request_id)
);
CREATE INDEX idempotency_keys_by_time ON idempotency_keys (create_time);

-- The double-entry ledger. A journal entry is immutable and balanced: its postings sum to
-- zero per currency, checked by a deferred constraint trigger when the transaction commits.
-- dedupe_key names the business fact an entry books ("sale:<ticket>", "refund:<ticket>",
-- ...): the unique index makes booking a fact twice impossible, whatever the code does.
CREATE TABLE journal_entries (
    id          text PRIMARY KEY,
    kind        text NOT NULL,
    subject     text NOT NULL,
    description text NOT NULL,
    dedupe_key  text NOT NULL UNIQUE,
    create_time timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE postings (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    entry_id      text NOT NULL REFERENCES journal_entries (id),
    account       text NOT NULL,
    -- The user owning the account (users/{user}/accounts/...), NULL for system accounts.
    user_id       text,
    amount_minor  bigint NOT NULL CHECK (amount_minor <> 0),
    currency_code text NOT NULL CHECK (currency_code ~ '^[A-Z]{3}$')
);
CREATE INDEX postings_by_entry ON postings (entry_id);
CREATE INDEX postings_by_user ON postings (user_id, entry_id) WHERE user_id IS NOT NULL;
CREATE INDEX postings_by_account ON postings (account, currency_code);

CREATE FUNCTION check_entry_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad text;
    lines integer;
BEGIN
    SELECT count(*) INTO lines FROM postings WHERE entry_id = NEW.entry_id;
    IF lines < 2 THEN
        RAISE EXCEPTION 'journal entry % has % posting(s); at least two are needed',
            NEW.entry_id, lines USING ERRCODE = 'check_violation';
    END IF;
    SELECT currency_code INTO bad FROM postings WHERE entry_id = NEW.entry_id
        GROUP BY currency_code HAVING sum(amount_minor) <> 0 LIMIT 1;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'journal entry % does not balance in %', NEW.entry_id, bad
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END;
$$;

-- Deferred to commit, so an entry's postings can be inserted one by one.
CREATE CONSTRAINT TRIGGER postings_balanced AFTER INSERT ON postings
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION check_entry_balanced();

CREATE FUNCTION refuse_ledger_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only; correct mistakes with new entries'
        USING ERRCODE = 'restrict_violation';
END;
$$;

CREATE TRIGGER postings_append_only BEFORE UPDATE OR DELETE ON postings
    FOR EACH ROW EXECUTE FUNCTION refuse_ledger_change();
CREATE TRIGGER journal_entries_append_only BEFORE UPDATE OR DELETE ON journal_entries
    FOR EACH ROW EXECUTE FUNCTION refuse_ledger_change();

-- The sandbox processor's state: what a real processor would keep on its side. It lives in
-- the database (not in memory) so that after payments crashes, reconciliation asks a
-- processor that still remembers what it did.
CREATE TABLE sandbox_charges (
    id              text PRIMARY KEY,
    idempotency_key text NOT NULL UNIQUE,
    amount_minor    bigint NOT NULL,
    currency_code   text NOT NULL,
    card_last4      text NOT NULL,
    status          text NOT NULL CHECK (status IN ('authorized', 'captured', 'voided', 'declined')),
    decline_code    text,
    refunded_minor  bigint NOT NULL DEFAULT 0,
    create_time     timestamptz NOT NULL DEFAULT now(),
    CHECK (refunded_minor <= amount_minor)
);

CREATE TABLE sandbox_refunds (
    id              text PRIMARY KEY,
    charge_id       text NOT NULL REFERENCES sandbox_charges (id),
    idempotency_key text NOT NULL UNIQUE,
    amount_minor    bigint NOT NULL CHECK (amount_minor > 0),
    create_time     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sandbox_payouts (
    id              text PRIMARY KEY,
    idempotency_key text NOT NULL UNIQUE,
    payee           text NOT NULL,
    amount_minor    bigint NOT NULL CHECK (amount_minor > 0),
    currency_code   text NOT NULL,
    status          text NOT NULL CHECK (status IN ('paid', 'failed')),
    failure_reason  text NOT NULL DEFAULT '',
    create_time     timestamptz NOT NULL DEFAULT now()
);
