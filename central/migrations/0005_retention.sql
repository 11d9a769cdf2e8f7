-- Cache retention and byte budgets: a resource cache whose last use goes is retained
-- (its volumes kept) while its worker has room, least recently used evicted first.

ALTER TABLE resource_caches
    -- When a use was last added or removed.
    ADD COLUMN last_used_at   timestamptz NOT NULL DEFAULT now(),
    -- When the last use went; NULL while a build uses the cache. A cache created without
    -- a use is retained from the start.
    ADD COLUMN retained_since timestamptz NULL DEFAULT now(),
    -- The scheduler's mark: 'auto' (retained while there is room), 'keep' (never evicted
    -- for the budget, only under pressure), 'drop' (deleted at the next pass once unused).
    ADD COLUMN retention      text NOT NULL DEFAULT 'auto'
        CHECK (retention IN ('auto', 'keep', 'drop'));

UPDATE resource_caches rc SET retained_since = NULL
 WHERE EXISTS (SELECT 1 FROM resource_cache_uses u WHERE u.resource_cache_id = rc.id);

CREATE INDEX resource_caches_retained_idx ON resource_caches (id) WHERE retained_since IS NOT NULL;

-- A new use revives the cache in the same statement (so in the same transaction): the
-- row update takes the cache row's lock, which the GC's eviction takes too (FOR UPDATE),
-- so an eviction and a new use of one cache are serialized and the eviction re-checks
-- `retained_since` under the lock.
CREATE FUNCTION resource_cache_uses_revive() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE resource_caches SET retained_since = NULL, last_used_at = now()
     WHERE id = NEW.resource_cache_id;
    RETURN NULL;
END $$;

CREATE TRIGGER resource_cache_uses_revive AFTER INSERT ON resource_cache_uses
    FOR EACH ROW EXECUTE FUNCTION resource_cache_uses_revive();

-- The last use going retains the cache. The first statement locks the cache row, so two
-- transactions removing the last two uses take turns, and the second statement (a new
-- snapshot) sees whether a use is left.
CREATE FUNCTION resource_cache_uses_retain() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE resource_caches SET last_used_at = now() WHERE id = OLD.resource_cache_id;
    UPDATE resource_caches SET retained_since = now()
     WHERE id = OLD.resource_cache_id AND retained_since IS NULL
       AND NOT EXISTS (SELECT 1 FROM resource_cache_uses u
                        WHERE u.resource_cache_id = OLD.resource_cache_id);
    RETURN NULL;
END $$;

CREATE TRIGGER resource_cache_uses_retain AFTER DELETE ON resource_cache_uses
    FOR EACH ROW EXECUTE FUNCTION resource_cache_uses_retain();

ALTER TABLE volumes
    -- Real bytes on the worker, from its last report that measured the volume.
    ADD COLUMN bytes               bigint NULL,
    -- Set when the GC took the volume from its resource cache to free room: which cache,
    -- why ('pressure', 'budget', 'dropped'), when, and the bytes that cache held on the
    -- worker then (what the eviction was expected to free).
    ADD COLUMN evicted_cache_id    bigint NULL,
    ADD COLUMN evict_reason        text NULL CHECK (evict_reason IN ('pressure', 'budget', 'dropped')),
    ADD COLUMN evicted_at          timestamptz NULL,
    ADD COLUMN evicted_cache_bytes bigint NULL;

ALTER TABLE workers
    -- Budgets set by the scheduler; NULL: the `[retention]` default of the config.
    ADD COLUMN cache_budget      bigint NULL CHECK (cache_budget >= 0),
    ADD COLUMN min_free          bigint NULL CHECK (min_free >= 0),
    -- Bytes of retained caches on the worker as the last GC pass counted them.
    ADD COLUMN retained_bytes    bigint NULL,
    -- Bytes and caches evicted on the worker, all time.
    ADD COLUMN evicted_bytes     bigint NOT NULL DEFAULT 0,
    ADD COLUMN evictions         bigint NOT NULL DEFAULT 0,
    -- The agent's own free-space floor from its last report (`gc.min_free` in bytes).
    ADD COLUMN reported_min_free bigint NULL,
    -- Since when its reports say `pressure` (NULL: not under pressure).
    ADD COLUMN pressure_since    timestamptz NULL;
