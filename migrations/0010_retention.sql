-- Retention (docs/plans-and-prices.md, "Retention"): the reaper purges soft-deleted
-- images and uploads nothing keeps, and compacts finished jobs' event logs, per the plan
-- each job was submitted under. It reads candidates in order of a "look again" time (when
-- a row's clock started, or when it last found the row not yet due: see
-- src/imagegen/domain/retention.py), so every pass reads only rows that may be due, from
-- the indexes below, never a whole table.

-- A job's event log after compaction: `first_sequence` is the oldest event still stored
-- (Generation.first_sequence; a replay starts there). Sequence numbers never change, so a
-- compacted log has gaps where its progress events were.
ALTER TABLE generations
    ADD COLUMN first_sequence      bigint NOT NULL DEFAULT 1,
    ADD COLUMN events_compacted_at timestamptz,
    -- the last time the reaper found this finished job's log not yet due
    ADD COLUMN events_checked_at   timestamptz;

-- Finished jobs whose logs are not compacted yet, by when the reaper should look.
CREATE INDEX generations_events_retention_idx
    ON generations ((greatest(events_checked_at, coalesce(completed_at, updated_at))), id)
    WHERE events_compacted_at IS NULL AND state IN ('completed', 'failed', 'cancelled');

-- The last time the reaper found this soft-deleted image or upload not yet due (or kept).
ALTER TABLE images ADD COLUMN retention_checked_at timestamptz;

-- Soft-deleted images, by when the reaper should look.
CREATE INDEX images_deleted_retention_idx
    ON images ((greatest(retention_checked_at, deleted_at)), id)
    WHERE deleted_at IS NOT NULL;
-- Live uploads that are neither a favourite nor tagged (those are kept), by when the
-- reaper should look.
CREATE INDEX images_upload_retention_idx
    ON images ((greatest(retention_checked_at, created_at)), id)
    WHERE upload AND deleted_at IS NULL AND NOT favorite AND tags = '{}';
-- An upload a live image was made from is kept: image_parents_parent_idx finds its
-- children. One an unfinished job uses is kept: generations_user_active_idx finds those.

-- Blobs whose rows are gone, to delete from the blob store. A row's purge inserts its key
-- here in the same transaction that deletes the row; the blob is deleted after that
-- commits, then its entry. A crash between the two leaves the entry, and the next pass
-- deletes the blob: never a row without its blob, never a blob nobody will delete.
CREATE TABLE blob_deletions (
    storage_key text        PRIMARY KEY,
    user_id     text        NOT NULL,
    size_bytes  bigint      NOT NULL,
    -- why its row went: deleted_image, upload (the RetentionKind)
    reason      text        NOT NULL,
    queued_at   timestamptz NOT NULL,
    -- failed attempts to delete the blob, and the last error (the entry is retried on
    -- every pass, in key order)
    attempts    integer     NOT NULL DEFAULT 0,
    last_error  text        NOT NULL DEFAULT ''
);

-- Blob keys that no image row names but that must stay: edit sources stored before
-- uploads became library images (migrations/0004_history.sql), which jobs' specs still
-- name by key. The orphan sweep keeps them. No code adds such keys any more.
CREATE TABLE retained_blob_keys (
    storage_key text PRIMARY KEY,
    reason      text NOT NULL
);
INSERT INTO retained_blob_keys (storage_key, reason)
SELECT DISTINCT edit_source ->> 'storage_key', 'edit source stored before uploads'
  FROM generations AS g,
       jsonb_array_elements(
           CASE WHEN jsonb_typeof(g.spec -> 'sources') = 'array'
                THEN g.spec -> 'sources' ELSE '[]'::jsonb END) AS edit_source
 WHERE coalesce(edit_source ->> 'image_id', '') = ''
   AND edit_source ->> 'storage_key' IS NOT NULL
UNION
SELECT g.spec -> 'mask' ->> 'storage_key', 'edit mask stored before uploads'
  FROM generations AS g
 WHERE jsonb_typeof(g.spec -> 'mask') = 'object'
   AND coalesce(g.spec -> 'mask' ->> 'image_id', '') = ''
   AND g.spec -> 'mask' ->> 'storage_key' IS NOT NULL
ON CONFLICT (storage_key) DO NOTHING;

-- When each of the reaper's tasks last finished (the orphan sweep runs once per
-- IMAGEGEN_GC_SWEEP_INTERVAL across every replica).
CREATE TABLE retention_runs (
    task        text        PRIMARY KEY,
    finished_at timestamptz NOT NULL
);
