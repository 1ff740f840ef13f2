-- Prompt assistance (proto/imagegen/v1/prompts.proto).
--
-- 1. prompt_history: one row per user and distinct prompt (compared lower-cased, runs of
--    whitespace as one space) that made at least one of the user's library images, with
--    what became of those images. SuggestPrompts reads only this table, in branches
--    that each stop at a LIMIT, through the indexes below (repositories/prompts.py).
--    Triggers on images keep it current in the same transaction as the change to the
--    image (stored, favourited, soft-deleted, restored, purged), whichever code path
--    makes it; edits (whose prompt is an instruction) and empty prompts are left out.
-- 2. usage_records.kind: a record is an attempt of a generation job or a prompt
--    enhancement; an enhancement has no job (generation_id NULL).

-- Trigram matching of typed text anywhere in a prompt; a trusted extension since
-- PostgreSQL 13: the database owner may create it.
CREATE EXTENSION IF NOT EXISTS pg_trgm;

-- What a prompt is compared and de-duplicated by. The query side uses the same function.
CREATE FUNCTION prompt_history_key(prompt text) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT lower(regexp_replace(btrim(prompt), '\s+', ' ', 'g')) $$;

-- The LIKE pattern that finds the key of `text` anywhere in a key.
CREATE FUNCTION prompt_history_pattern(text text) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT '%' || replace(replace(replace(prompt_history_key(text), '\', '\\'),
                                        '%', '\%'), '_', '\_') || '%' $$;

CREATE TABLE prompt_history (
    user_id        text        NOT NULL,
    -- SHA-256 of prompt_key (UTF-8): a prompt may be 4000 characters, more than a btree
    -- entry holds; md5 is refused by PostgreSQL servers in FIPS mode
    prompt_hash    bytea       NOT NULL,
    -- byte order ("C"), so that a prefix is a plain range of the btree below
    prompt_key     text        COLLATE "C" NOT NULL,
    -- the prompt as the user last wrote it
    prompt         text        NOT NULL,
    -- the style it was last used with ('' for none)
    style          text        NOT NULL DEFAULT '',
    -- images it ever made, and what they are now: live (not deleted), kept (favourite
    -- and not deleted), deleted (soft-deleted or purged)
    images_made    integer     NOT NULL DEFAULT 0,
    live_images    integer     NOT NULL DEFAULT 0,
    kept_images    integer     NOT NULL DEFAULT 0,
    deleted_images integer     NOT NULL DEFAULT 0,
    last_used_at   timestamptz NOT NULL,
    PRIMARY KEY (user_id, prompt_hash)
);

-- Completions that start with the text: a range over the first 256 characters
-- (at most 1 KiB, within a btree entry's limit); the query checks longer texts in full.
CREATE INDEX prompt_history_prefix_idx
    ON prompt_history (user_id, left(prompt_key, 256));
-- Completions that contain the text (three characters or more): the rows holding its
-- trigrams, which the planner ANDs with the user's rows from a btree above, or, for a
-- common text, it reads the user's rows until enough match (bench/README.md). A user_id
-- column inside this GIN (btree_gin) was tried: for a user with many prompts the
-- planner then never used it and read all of them.
CREATE INDEX prompt_history_trgm_idx ON prompt_history USING gin (prompt_key gin_trgm_ops);
-- The user's most recent prompts, and their kept ones (also what an empty text gets).
CREATE INDEX prompt_history_recent_idx ON prompt_history (user_id, last_used_at DESC);
CREATE INDEX prompt_history_kept_idx
    ON prompt_history (user_id, last_used_at DESC) WHERE kept_images > 0;

-- An image's share of its prompt's counts; removed and added back on every change.
CREATE FUNCTION prompt_history_apply(
    image images, sign integer, made integer, purged boolean
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    key text;
BEGIN
    IF image.is_edit OR btrim(image.prompt) = '' THEN
        RETURN;
    END IF;
    key := prompt_history_key(image.prompt);
    IF sign > 0 AND made > 0 THEN
        INSERT INTO prompt_history AS h (user_id, prompt_hash, prompt_key, prompt, style,
                                         images_made, live_images, kept_images,
                                         deleted_images, last_used_at)
        VALUES (image.user_id, sha256(convert_to(key, 'UTF8')), key, image.prompt,
                image.style, 1,
                (image.deleted_at IS NULL)::int,
                (image.favorite AND image.deleted_at IS NULL)::int,
                (image.deleted_at IS NOT NULL)::int,
                image.created_at)
        ON CONFLICT (user_id, prompt_hash) DO UPDATE SET
            images_made = h.images_made + 1,
            live_images = h.live_images + excluded.live_images,
            kept_images = h.kept_images + excluded.kept_images,
            deleted_images = h.deleted_images + excluded.deleted_images,
            prompt = CASE WHEN excluded.last_used_at >= h.last_used_at
                          THEN excluded.prompt ELSE h.prompt END,
            style = CASE WHEN excluded.last_used_at >= h.last_used_at
                         THEN excluded.style ELSE h.style END,
            last_used_at = greatest(h.last_used_at, excluded.last_used_at);
        RETURN;
    END IF;
    UPDATE prompt_history SET
        live_images = live_images + sign * (image.deleted_at IS NULL AND NOT purged)::int,
        kept_images = kept_images
                      + sign * (image.favorite AND image.deleted_at IS NULL AND NOT purged)::int,
        deleted_images = deleted_images + sign * (image.deleted_at IS NOT NULL OR purged)::int
     WHERE user_id = image.user_id AND prompt_hash = sha256(convert_to(key, 'UTF8'));
END;
$$;

CREATE FUNCTION prompt_history_on_image() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM prompt_history_apply(NEW, 1, 1, false);
    ELSIF TG_OP = 'UPDATE' THEN
        PERFORM prompt_history_apply(OLD, -1, 0, false);
        PERFORM prompt_history_apply(NEW, 1, 0, false);
    ELSE
        -- Purged for good: what it counted as goes, and it counts as deleted.
        PERFORM prompt_history_apply(OLD, -1, 0, false);
        PERFORM prompt_history_apply(OLD, 1, 0, true);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER images_prompt_history_insert AFTER INSERT ON images
    FOR EACH ROW EXECUTE FUNCTION prompt_history_on_image();
CREATE TRIGGER images_prompt_history_update AFTER UPDATE OF favorite, deleted_at ON images
    FOR EACH ROW
    WHEN (OLD.favorite IS DISTINCT FROM NEW.favorite
          OR (OLD.deleted_at IS NULL) IS DISTINCT FROM (NEW.deleted_at IS NULL))
    EXECUTE FUNCTION prompt_history_on_image();
CREATE TRIGGER images_prompt_history_delete AFTER DELETE ON images
    FOR EACH ROW EXECUTE FUNCTION prompt_history_on_image();

-- The images stored before this migration.
INSERT INTO prompt_history (user_id, prompt_hash, prompt_key, prompt, style, images_made,
                            live_images, kept_images, deleted_images, last_used_at)
SELECT user_id, sha256(convert_to(key, 'UTF8')), key,
       (array_agg(prompt ORDER BY created_at DESC))[1],
       (array_agg(style ORDER BY created_at DESC))[1],
       count(*),
       count(*) FILTER (WHERE deleted_at IS NULL),
       count(*) FILTER (WHERE favorite AND deleted_at IS NULL),
       count(*) FILTER (WHERE deleted_at IS NOT NULL),
       max(created_at)
  FROM (SELECT i.*, prompt_history_key(i.prompt) AS key
          FROM images i WHERE NOT i.is_edit AND btrim(i.prompt) <> '') AS kept
 GROUP BY user_id, key;

-- Usage records of prompt enhancements: no job, and a kind to tell them apart.
ALTER TABLE usage_records
    ADD COLUMN kind text NOT NULL DEFAULT 'generation'
        CHECK (kind IN ('generation', 'prompt_enhancement'));
