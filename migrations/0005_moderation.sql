-- Content moderation: every decision on a text that would become a prompt, and per-user
-- abuse counters with the suspension they lead to. Texts are stored as SHA-256 hashes;
-- the texts themselves only for blocked or flagged decisions, and only when
-- IMAGEGEN_MODERATION_STORE_TEXT is on.

CREATE TABLE moderation_decisions (
    id            uuid        PRIMARY KEY,
    user_id       text        NOT NULL,
    sub_account   text        NOT NULL DEFAULT '',
    plan          text        NOT NULL DEFAULT '',
    purpose       text        NOT NULL
                  CHECK (purpose IN ('generate', 'edit', 'template', 'enhance', 'provider_output')),
    decision      text        NOT NULL CHECK (decision IN ('allowed', 'flagged', 'blocked')),
    -- the categories that decided it (blocking ones when blocked, flagging ones when flagged)
    categories    text[]      NOT NULL DEFAULT '{}',
    -- every score seen, by category: {"sexual": 0.93, ...}
    scores        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- the moderators that answered, in chain order ("rules,openai"; "provider:openai")
    moderators    text        NOT NULL,
    -- moderators that could not answer when the policy failed open
    unavailable   text[]      NOT NULL DEFAULT '{}',
    -- hex SHA-256 of each checked text by field: {"prompt": "...", "negative_prompt": "..."}
    text_sha256   jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- the texts by field, only when the deployment allows it and the decision is not allowed
    texts         jsonb,
    -- the job, for a provider's own verdict on it
    generation_id uuid,
    created_at    timestamptz NOT NULL
);

-- `imagegen moderation list [--decision D] [--since T]`: newest first, allowed ones skipped.
CREATE INDEX moderation_decisions_review_idx
    ON moderation_decisions (decision, created_at DESC, id DESC) WHERE decision <> 'allowed';
-- `imagegen moderation list --user U`: one user's decisions, newest first.
CREATE INDEX moderation_decisions_user_idx
    ON moderation_decisions (user_id, created_at DESC, id DESC);
-- The suspension rule: a user's blocks within a window.
CREATE INDEX moderation_decisions_user_blocked_idx
    ON moderation_decisions (user_id, created_at) WHERE decision = 'blocked';

-- Per-user abuse counters (all time) and the current suspension, if any.
CREATE TABLE moderation_users (
    user_id            text        PRIMARY KEY,
    blocked_total      bigint      NOT NULL DEFAULT 0,
    flagged_total      bigint      NOT NULL DEFAULT 0,
    failed_generations bigint      NOT NULL DEFAULT 0,
    last_blocked_at    timestamptz,
    last_failed_at     timestamptz,
    suspended_until    timestamptz,
    suspensions        integer     NOT NULL DEFAULT 0,
    updated_at         timestamptz NOT NULL DEFAULT now()
);
-- Operators: the users with the most blocks.
CREATE INDEX moderation_users_blocked_idx ON moderation_users (blocked_total DESC);
