-- What the operator's view answers: each worker's last report (volume-central workers), and
-- why a volume is kept or going, since when (GET /api/v1/volumes/{h}/why).

ALTER TABLE workers
    ADD COLUMN last_report_at   timestamptz NULL,
    ADD COLUMN revision_seen    bigint NULL,
    ADD COLUMN volume_count     bigint NULL,
    ADD COLUMN volume_bytes     bigint NULL,
    ADD COLUMN disk_total_bytes bigint NULL,
    ADD COLUMN disk_free_bytes  bigint NULL,
    ADD COLUMN pressure         boolean NULL,
    ADD COLUMN failed_count     integer NULL,
    ADD COLUMN blocked_count    integer NULL;

ALTER TABLE volumes
    -- When the volume lost its last owner (container, resource cache, base resource type).
    ADD COLUMN unowned_since    timestamptz NULL,
    -- When the GC marked it `destroying`, and why.
    ADD COLUMN destroying_since timestamptz NULL,
    ADD COLUMN destroy_reason   text NULL CHECK (destroy_reason IN ('unowned', 'missing'));

-- Keeps `unowned_since` on every change of an owner column, the foreign keys' ON DELETE
-- SET NULL included (a deleted container or cache): set when the last owner goes, kept
-- while none comes back, cleared when one does. Column-specific, so a report's updates
-- (state, missing_since) do not run it.
CREATE FUNCTION volumes_track_unowned() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.resource_cache_id IS NULL AND NEW.worker_base_resource_type_id IS NULL
       AND NEW.container_id IS NULL THEN
        IF NEW.unowned_since IS NULL THEN
            NEW.unowned_since := now();
        END IF;
    ELSE
        NEW.unowned_since := NULL;
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER volumes_unowned
    BEFORE INSERT OR UPDATE OF resource_cache_id, worker_base_resource_type_id, container_id
    ON volumes FOR EACH ROW EXECUTE FUNCTION volumes_track_unowned();

-- Rows from before this migration: unowned since now, the earliest time known.
UPDATE volumes SET unowned_since = now()
 WHERE resource_cache_id IS NULL AND worker_base_resource_type_id IS NULL
   AND container_id IS NULL;
