-- Batches (BatchGenerate): several jobs accepted together under one request id, run at
-- most the plan's concurrency at a time, and told to one callback once all have ended.

CREATE TABLE batches (
    id              uuid PRIMARY KEY,
    user_id         text        NOT NULL,
    request_id      text,
    -- canonical JSON of the batch's parameters: every spec's fingerprint, in order, and
    -- the callback URL (the idempotency check of a retried request_id)
    fingerprint     jsonb       NOT NULL,
    -- where to POST once every job has ended (the whole URL); empty for none
    callback_uri    text        NOT NULL DEFAULT '',
    job_count       integer     NOT NULL CHECK (job_count >= 1),
    -- jobs that have not ended yet. The unit of work that ends a job takes one off (the
    -- row lock orders concurrent ends, on any replica); the one that reaches 0 is the
    -- batch's last and queues its callback, so it is queued exactly once.
    unfinished_jobs integer     NOT NULL CHECK (unfinished_jobs >= 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- when its last job ended; NULL before
    completed_at    timestamptz
);

-- One batch per (user, request_id); the remembering window is enforced by the service.
CREATE UNIQUE INDEX batches_user_request_id_key
    ON batches (user_id, request_id) WHERE request_id IS NOT NULL;

ALTER TABLE generations
    -- the batch it was submitted in; NULL for a single job
    ADD COLUMN batch_id       uuid    REFERENCES batches (id),
    -- its position in the batch's request, from 0
    ADD COLUMN batch_index    integer CHECK (batch_index >= 0),
    -- a batch job starts only while its owner runs fewer jobs than this: the plan's
    -- concurrent generations when it was submitted; NULL for no such wait
    ADD COLUMN max_concurrent integer CHECK (max_concurrent >= 1);

-- A batch's jobs in request order (ListGenerations' batch filter, the batch's callback).
CREATE INDEX generations_batch_idx ON generations (batch_id, batch_index)
    WHERE batch_id IS NOT NULL;

-- The gate that keeps a user's batch jobs within their plan's concurrency, whichever
-- replica claims them. A worker's claim (repositories/generations.py) turns queued jobs
-- into running ones in one UPDATE; for a job with max_concurrent this trigger runs before
-- its row changes and leaves it queued (RETURN NULL skips the row) while its owner
-- already runs that many.
--
-- Why a trigger with an advisory lock, rather than a count in the claim's own WHERE: a
-- statement's subqueries all read one snapshot taken when it started, so two replicas
-- claiming at the same moment would both count the same running jobs and both pass. Here
-- the count is a statement of its own, run after the owner's claim lock is held, so its
-- snapshot includes every claim committed before; and it sees the rows this claim has
-- already turned to running (a row-level BEFORE trigger sees the earlier rows of its own
-- statement), so one claim of several jobs counts each one. The lock is held until the
-- claim commits. It is only tried: a claim that finds another replica claiming for the
-- same user leaves that user's batch job queued for its next look (the claim loop looks
-- again when a slot frees and every poll interval), so claims never wait on each other
-- and two claims over several users cannot deadlock. Single jobs (max_concurrent NULL)
-- and re-claims of expired leases (running to running) never reach it.
CREATE FUNCTION generations_batch_gate() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    running integer;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtextextended('imagegen-claim:' || NEW.user_id, 0)) THEN
        RETURN NULL;
    END IF;
    SELECT count(*) INTO running
      FROM generations
     WHERE user_id = NEW.user_id AND state = 'running';
    IF running >= NEW.max_concurrent THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER generations_batch_gate BEFORE UPDATE OF state ON generations
    FOR EACH ROW
    WHEN (OLD.state = 'queued' AND NEW.state = 'running' AND NEW.max_concurrent IS NOT NULL)
    EXECUTE FUNCTION generations_batch_gate();
