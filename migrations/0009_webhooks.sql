-- Signed webhooks (Standard Webhooks): an outbox of callbacks written in the same
-- transaction that ends a job, every delivery attempt, and each user's signing secrets.

-- One callback to deliver: a job's terminal state (or, for a batch, the end of its last
-- job). Rows are claimed by a worker on any replica with FOR UPDATE SKIP LOCKED; a claim
-- counts the attempt and pushes next_attempt_at past the attempt's timeout, so a replica
-- that dies mid-attempt leaves the row due again instead of lost. A row that reached
-- 'delivered' is never claimed again.
CREATE TABLE webhook_deliveries (
    -- the `webhook-id` header, the same on every attempt: receivers deduplicate by it
    webhook_id      text        PRIMARY KEY,
    user_id         text        NOT NULL,
    -- what the callback is about: one job, or one batch (then every job of it)
    generation_id   uuid        REFERENCES generations (id),
    batch_id        text,
    -- where to POST (the whole URL: its query string may carry the receiver's token)
    url             text        NOT NULL,
    -- generation.completed | generation.failed | generation.cancelled | batch.completed
    event_type      text        NOT NULL,
    -- when the job (or the batch) ended
    event_time      timestamptz NOT NULL DEFAULT now(),
    state           text        NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'delivered', 'failed')),
    -- attempts started so far (a claim adds one)
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    -- the worker that holds the current attempt; NULL between attempts
    claimed_by      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((generation_id IS NULL) <> (batch_id IS NULL))
);

-- A job ends once, and so does a batch: at most one callback each.
CREATE UNIQUE INDEX webhook_deliveries_generation_idx
    ON webhook_deliveries (generation_id) WHERE generation_id IS NOT NULL;
CREATE UNIQUE INDEX webhook_deliveries_batch_idx
    ON webhook_deliveries (batch_id) WHERE batch_id IS NOT NULL;
-- The workers' claim: due pending rows, oldest due first.
CREATE INDEX webhook_deliveries_due_idx
    ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';

-- Every attempt, as GetGeneration shows it (Generation.webhook_deliveries).
CREATE TABLE webhook_attempts (
    webhook_id   text        NOT NULL REFERENCES webhook_deliveries (webhook_id),
    attempt      integer     NOT NULL,
    attempt_time timestamptz NOT NULL,
    -- the receiver's HTTP status; 0 when no answer came
    http_status  integer     NOT NULL DEFAULT 0,
    -- why it failed, for people; empty when delivered
    error        text        NOT NULL DEFAULT '',
    delivered    boolean     NOT NULL DEFAULT false,
    PRIMARY KEY (webhook_id, attempt)
);

-- Users' signing secrets, one row per version: the newest signs, and the one before it
-- also signs until previous_expires_at (the grace period of a rotation). The secret is
-- stored encrypted (AES-256-GCM under the deployment's IMAGEGEN_WEBHOOK_KEY, bound to
-- its user and version); key_id names the key that encrypted it.
CREATE TABLE webhook_secrets (
    user_id             text        NOT NULL,
    version             integer     NOT NULL CHECK (version >= 1),
    secret_ciphertext   bytea       NOT NULL,
    key_id              text        NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    -- until when the version before this one also signs; NULL for the first version
    previous_expires_at timestamptz,
    -- the RotateWebhookSecret request_id that made this version (remembered like a
    -- submit's, for IMAGEGEN_REQUEST_ID_TTL)
    request_id          text,
    PRIMARY KEY (user_id, version)
);

CREATE UNIQUE INDEX webhook_secrets_request_idx
    ON webhook_secrets (user_id, request_id) WHERE request_id IS NOT NULL;
