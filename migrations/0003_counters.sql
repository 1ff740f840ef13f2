-- Per-user counters kept in the transaction that changes the rows they sum, so that a
-- submit, GetCreditBalance and the storage quota read one row however long a user's
-- history grows. The rows stay the source of truth: every counter equals its sum
-- (tests/integration/test_counters.py), and a counter is rebuilt from them below.

-- Credits: the append-only ledger summed by bucket. The ledger takes no UPDATE or
-- DELETE (a correction is a new row), so an insert trigger keeps the sum exact.
CREATE TABLE credit_balances (
    user_id                text        PRIMARY KEY,
    -- sum(amount) of the user's ledger rows in the allowance bucket
    allowance_credits      bigint      NOT NULL DEFAULT 0,
    -- sum(amount) of the user's ledger rows in the purchased bucket
    purchased_credits      bigint      NOT NULL DEFAULT 0,
    -- the latest period whose allowance is granted; NULL until the first grant
    allowance_period_start timestamptz
);

CREATE FUNCTION credit_balances_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO credit_balances AS b
           (user_id, allowance_credits, purchased_credits, allowance_period_start)
    VALUES (NEW.user_id,
            CASE WHEN NEW.bucket = 'allowance' THEN NEW.amount ELSE 0 END,
            CASE WHEN NEW.bucket = 'purchased' THEN NEW.amount ELSE 0 END,
            CASE WHEN NEW.kind = 'allowance' THEN NEW.period_start END)
    ON CONFLICT (user_id) DO UPDATE
       SET allowance_credits = b.allowance_credits + EXCLUDED.allowance_credits,
           purchased_credits = b.purchased_credits + EXCLUDED.purchased_credits,
           -- greatest() skips NULLs: a row that grants no allowance keeps the period
           allowance_period_start = greatest(b.allowance_period_start,
                                             EXCLUDED.allowance_period_start);
    RETURN NULL;
END
$$;

CREATE FUNCTION credit_ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'credit_ledger is append-only: add a correcting row instead'
        USING ERRCODE = 'restrict_violation';
END
$$;

-- Triggers first: they lock the tables, so no row can slip in between the backfill
-- below and the commit of this migration.
CREATE TRIGGER credit_balances_add AFTER INSERT ON credit_ledger
    FOR EACH ROW EXECUTE FUNCTION credit_balances_add();
CREATE TRIGGER credit_ledger_append_only BEFORE UPDATE OR DELETE ON credit_ledger
    FOR EACH ROW EXECUTE FUNCTION credit_ledger_append_only();

INSERT INTO credit_balances (user_id, allowance_credits, purchased_credits, allowance_period_start)
SELECT user_id,
       coalesce(sum(amount) FILTER (WHERE bucket = 'allowance'), 0),
       coalesce(sum(amount) FILTER (WHERE bucket = 'purchased'), 0),
       max(period_start) FILTER (WHERE kind = 'allowance')
  FROM credit_ledger
 GROUP BY user_id;

-- Storage: bytes of the user's image rows (soft-deleted ones count until purged).
-- Every insert, purge, or change of an image's owner or size moves the counter, whichever
-- code path stores the image (generated images and uploaded edit sources alike).
CREATE TABLE storage_usage (
    user_id    text   PRIMARY KEY,
    used_bytes bigint NOT NULL DEFAULT 0
);

CREATE FUNCTION storage_usage_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE storage_usage SET used_bytes = used_bytes - OLD.size_bytes
         WHERE user_id = OLD.user_id;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO storage_usage AS s (user_id, used_bytes) VALUES (NEW.user_id, NEW.size_bytes)
        ON CONFLICT (user_id) DO UPDATE SET used_bytes = s.used_bytes + EXCLUDED.used_bytes;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER storage_usage_count AFTER INSERT OR DELETE OR UPDATE OF user_id, size_bytes
    ON images FOR EACH ROW EXECUTE FUNCTION storage_usage_count();

INSERT INTO storage_usage (user_id, used_bytes)
SELECT user_id, sum(size_bytes) FROM images GROUP BY user_id;

-- Jobs queued or running, per user: the concurrent-jobs count and the credits they hold
-- read only these rows, however many finished jobs the user has.
CREATE INDEX generations_user_active_idx ON generations (user_id)
    WHERE state IN ('queued', 'running');
