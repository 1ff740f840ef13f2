-- Credits: an append-only ledger per user whose sum is the balance. Two buckets: the
-- plan's monthly allowance (expires at the period's end) and purchased or granted
-- credits (never expire). Reservations are spent from the allowance first.

CREATE TABLE credit_ledger (
    id            bigserial   PRIMARY KEY,
    user_id       text        NOT NULL,
    kind          text        NOT NULL
                  CHECK (kind IN ('grant', 'allowance', 'expire', 'reserve', 'refund')),
    bucket        text        NOT NULL CHECK (bucket IN ('allowance', 'purchased')),
    amount        integer     NOT NULL,
    generation_id uuid,
    period_start  timestamptz,
    note          text        NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Balances are sums over a user's rows.
CREATE INDEX credit_ledger_user_idx ON credit_ledger (user_id, created_at);
-- One allowance per user and period, whoever gets there first.
CREATE UNIQUE INDEX credit_ledger_allowance_key
    ON credit_ledger (user_id, period_start) WHERE kind = 'allowance';
-- A job's reservation is settled once per bucket.
CREATE UNIQUE INDEX credit_ledger_refund_key
    ON credit_ledger (generation_id, bucket) WHERE kind = 'refund';
CREATE INDEX credit_ledger_generation_idx ON credit_ledger (generation_id) WHERE generation_id IS NOT NULL;
