-- History that adds up: edit sources and masks a caller uploads become their own library
-- images (marked `upload`), every image records what the job's result carries (the
-- owner's sub-account, the credits charged for it, how long making it took), and prompt
-- templates remember the request_id they were created for.

-- An upload is the caller's image, not a provider's: it belongs to the job it was
-- supplied to (generation_id) at its position among that job's sources (batch_index,
-- the mask after the sources), so it has no place in the job's batch of results.
ALTER TABLE images
    ADD COLUMN upload              boolean NOT NULL DEFAULT false,
    ADD COLUMN sub_account         text    NOT NULL DEFAULT '',
    ADD COLUMN credits             integer NOT NULL DEFAULT 0,
    -- from the provider call's start to the image's storage; NULL for an upload, and for
    -- images stored before this was measured
    ADD COLUMN generation_duration interval,
    -- the SHA-256 of an upload's bytes (hex): the same content uploaded again by its owner
    -- reuses the image
    ADD COLUMN sha256              text;

-- Each batch index of a job is stored once, by any attempt; uploads are outside the batch.
ALTER TABLE images DROP CONSTRAINT images_generation_id_batch_index_key;
CREATE UNIQUE INDEX images_generation_batch_key
    ON images (generation_id, batch_index) WHERE NOT upload;
-- An owner's live upload of the same content (submit looks it up before storing again).
CREATE INDEX images_user_upload_sha256_idx
    ON images (user_id, sha256) WHERE upload AND deleted_at IS NULL;

-- Images stored before: the sub-account their job was submitted under, and their share of
-- the job's settled credits (a finished job charges the same price for every image it
-- stored, so the share is exact). Their duration was not measured and stays unset.
-- Sources uploaded before this migration stay where they are (`sources/...` keys in the
-- job's spec): the pipeline reads them by key, GetGeneration shows them as signed URLs,
-- and a rerun turns them into uploads.
UPDATE images AS i
   SET sub_account = g.sub_account,
       credits = CASE WHEN g.state IN ('completed', 'failed', 'cancelled')
                      THEN g.credits / stored.image_count ELSE 0 END
  FROM generations AS g,
       (SELECT generation_id, count(*) AS image_count
          FROM images WHERE generation_id IS NOT NULL GROUP BY generation_id) AS stored
 WHERE i.generation_id = g.id
   AND stored.generation_id = g.id;

-- CreatePromptTemplate's request_id, as generations keep theirs: the same id and the same
-- parameters give back the template made first; the parameters are kept to tell a retry
-- from a reuse. Forgotten (set to NULL) once older than IMAGEGEN_REQUEST_ID_TTL.
ALTER TABLE prompt_templates
    ADD COLUMN request_id  text,
    ADD COLUMN fingerprint jsonb;
CREATE UNIQUE INDEX prompt_templates_owner_request_id_key
    ON prompt_templates (owner_id, request_id) WHERE request_id IS NOT NULL;
