-- The first schema: generation jobs and their event logs, images, usage records,
-- prompt templates and per-user settings. Every list query has an index below.

CREATE TABLE generations (
    id               uuid PRIMARY KEY,
    user_id          text        NOT NULL,
    sub_account      text        NOT NULL DEFAULT '',
    request_id       text,
    -- canonical JSON of the parameters that decide the result (idempotency check)
    fingerprint      jsonb       NOT NULL,
    prompt           text        NOT NULL,
    negative_prompt  text        NOT NULL DEFAULT '',
    style            text        NOT NULL DEFAULT '',
    width            integer     NOT NULL,
    height           integer     NOT NULL,
    image_count      integer     NOT NULL CHECK (image_count BETWEEN 1 AND 4),
    output_format    text        NOT NULL,
    seed             bigint,
    source           text        NOT NULL DEFAULT 'api',
    -- full request (sources, mask, model) for reruns and workers
    spec             jsonb       NOT NULL,
    provider         text        NOT NULL,
    model            text        NOT NULL DEFAULT '',
    state            text        NOT NULL CHECK (state IN ('queued', 'running', 'completed', 'failed', 'cancelled')),
    credits          integer     NOT NULL DEFAULT 0,
    attempts         integer     NOT NULL DEFAULT 0,
    cancel_requested boolean     NOT NULL DEFAULT false,
    lease_owner      text,
    lease_expires_at timestamptz,
    error_code       text        NOT NULL DEFAULT '',
    error_message    text        NOT NULL DEFAULT '',
    last_sequence    bigint      NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    completed_at     timestamptz
);

-- One job per (user, request_id); the 24-hour window is enforced by the service.
CREATE UNIQUE INDEX generations_user_request_id_key
    ON generations (user_id, request_id) WHERE request_id IS NOT NULL;
-- ListGenerations: the owner's jobs, newest first, optionally by state.
CREATE INDEX generations_user_created_idx ON generations (user_id, created_at DESC, id DESC);
CREATE INDEX generations_user_state_created_idx
    ON generations (user_id, state, created_at DESC, id DESC);
-- Workers claim the oldest queued job; expired leases are found by time.
CREATE INDEX generations_queued_idx ON generations (created_at) WHERE state = 'queued';
CREATE INDEX generations_running_lease_idx ON generations (lease_expires_at) WHERE state = 'running';

CREATE TABLE generation_events (
    generation_id uuid        NOT NULL REFERENCES generations (id) ON DELETE CASCADE,
    sequence      bigint      NOT NULL CHECK (sequence >= 1),
    event_type    text        NOT NULL,
    payload       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    preview       bytea,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (generation_id, sequence)
);

CREATE TABLE images (
    id              uuid PRIMARY KEY,
    user_id         text        NOT NULL,
    generation_id   uuid        REFERENCES generations (id) ON DELETE SET NULL,
    batch_index     integer     NOT NULL DEFAULT 0,
    storage_key     text        NOT NULL UNIQUE,
    mime_type       text        NOT NULL,
    width           integer     NOT NULL,
    height          integer     NOT NULL,
    size_bytes      bigint      NOT NULL,
    provider        text        NOT NULL,
    model           text        NOT NULL DEFAULT '',
    prompt          text        NOT NULL,
    negative_prompt text        NOT NULL DEFAULT '',
    style           text        NOT NULL DEFAULT '',
    seed            bigint,
    title           text        NOT NULL DEFAULT '',
    description     text        NOT NULL DEFAULT '',
    tags            text[]      NOT NULL DEFAULT '{}',
    favorite        boolean     NOT NULL DEFAULT false,
    is_edit         boolean     NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    deleted_at      timestamptz,
    search          tsvector GENERATED ALWAYS AS (
        to_tsvector('english', prompt || ' ' || title || ' ' || description)
    ) STORED,
    -- a job stores each of its images once, even when a retried attempt runs again
    UNIQUE (generation_id, batch_index)
);

CREATE INDEX images_user_created_idx ON images (user_id, created_at DESC, id DESC);
CREATE INDEX images_search_idx ON images USING gin (search);
CREATE INDEX images_tags_idx ON images USING gin (tags);

CREATE TABLE image_parents (
    image_id  uuid    NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    parent_id uuid    NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    position  integer NOT NULL DEFAULT 0,
    PRIMARY KEY (image_id, parent_id)
);
CREATE INDEX image_parents_parent_idx ON image_parents (parent_id);

CREATE TABLE usage_records (
    id            uuid PRIMARY KEY,
    user_id       text        NOT NULL,
    generation_id uuid        REFERENCES generations (id) ON DELETE SET NULL,
    attempt       integer     NOT NULL DEFAULT 1,
    provider      text        NOT NULL,
    model         text        NOT NULL DEFAULT '',
    source        text        NOT NULL DEFAULT 'api',
    status        text        NOT NULL CHECK (status IN ('succeeded', 'failed', 'cancelled')),
    image_count   integer     NOT NULL DEFAULT 0,
    credits       integer     NOT NULL DEFAULT 0,
    cost_cents    integer,
    error_code    text        NOT NULL DEFAULT '',
    error_message text        NOT NULL DEFAULT '',
    requested_at  timestamptz NOT NULL,
    completed_at  timestamptz NOT NULL DEFAULT now(),
    -- one record per attempt of a job
    UNIQUE (generation_id, attempt)
);
CREATE INDEX usage_records_user_requested_idx ON usage_records (user_id, requested_at DESC, id DESC);

CREATE TABLE prompt_templates (
    id          uuid PRIMARY KEY,
    owner_id    text        NOT NULL,
    sub_account text        NOT NULL DEFAULT '',
    shared      boolean     NOT NULL DEFAULT false,
    name        text        NOT NULL,
    description text        NOT NULL DEFAULT '',
    prompt      text        NOT NULL,
    style       text        NOT NULL DEFAULT '',
    category    text        NOT NULL DEFAULT '',
    variables   jsonb       NOT NULL DEFAULT '[]'::jsonb,
    usage_count bigint      NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX prompt_templates_owner_idx ON prompt_templates (owner_id, created_at DESC, id DESC);
CREATE INDEX prompt_templates_shared_idx
    ON prompt_templates (sub_account, created_at DESC, id DESC) WHERE shared;

CREATE TABLE user_settings (
    user_id          text PRIMARY KEY,
    default_provider text        NOT NULL DEFAULT '',
    updated_at       timestamptz NOT NULL DEFAULT now()
);
