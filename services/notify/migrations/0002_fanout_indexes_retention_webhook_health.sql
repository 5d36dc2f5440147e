-- The inbox keeps two indexes instead of three key orders: ``id`` alone as the primary key
-- (ids come from a sequence, so every insert appends at the right edge of that index) and
-- the unique ``(user_id, dedupe_key)``, which also finds a user's rows for the inbox page,
-- the unread count and live delivery. A fan-out inserts a million rows; the former
-- ``(user_id, id)`` key cost about a third of each batch insert (bench/notify_fanout.py).
-- A user's page is then sorted from their rows, which retention keeps bounded.
ALTER TABLE notifications DROP CONSTRAINT notifications_pkey;
ALTER TABLE notifications ADD PRIMARY KEY (id);

-- Webhook health: failed attempts in a row (any delivery), reset by a success. At
-- NOTIFY_WEBHOOK_DISABLE_AFTER_FAILURES the webhook is disabled (state 2) with the reason,
-- its queued deliveries are dead-lettered, and its owner sees it in ListWebhooks.
ALTER TABLE webhooks
    ADD COLUMN consecutive_failures integer     NOT NULL DEFAULT 0,
    ADD COLUMN last_failure_time    timestamptz,
    ADD COLUMN disabled_time        timestamptz,
    ADD COLUMN disabled_reason      text        NOT NULL DEFAULT '';
