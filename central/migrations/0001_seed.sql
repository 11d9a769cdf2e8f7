-- The seed schema: Concourse's volume GC tables, with the seed's names.

CREATE TABLE workers (
    name       text PRIMARY KEY,
    -- Bumped in the same transaction as any change to this worker's volumes
    -- (triggers below), so the desired-set answer is one indexed read.
    revision   bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE base_resource_types (
    id      bigserial PRIMARY KEY,
    name    text NOT NULL,
    version text NOT NULL,
    UNIQUE (name, version)
);

CREATE TABLE worker_base_resource_types (
    id                    bigserial PRIMARY KEY,
    worker_name           text NOT NULL REFERENCES workers (name) ON DELETE CASCADE,
    base_resource_type_id bigint NOT NULL REFERENCES base_resource_types (id) ON DELETE CASCADE,
    UNIQUE (worker_name, base_resource_type_id)
);

CREATE TABLE resource_configs (
    id                    bigserial PRIMARY KEY,
    resource_cache_id     bigint NULL,
    base_resource_type_id bigint NULL REFERENCES base_resource_types (id) ON DELETE CASCADE,
    source_hash           text NOT NULL,
    params_hash           text NOT NULL DEFAULT ''
);

CREATE TABLE resource_caches (
    id                 bigserial PRIMARY KEY,
    resource_config_id bigint NOT NULL REFERENCES resource_configs (id) ON DELETE CASCADE,
    version            text NOT NULL,
    UNIQUE (resource_config_id, version)
);

-- A config built on a custom resource type points at that type's cache.
ALTER TABLE resource_configs
    ADD CONSTRAINT resource_configs_resource_cache_id_fkey
    FOREIGN KEY (resource_cache_id) REFERENCES resource_caches (id) ON DELETE CASCADE;

CREATE TABLE resource_cache_uses (
    resource_cache_id bigint NOT NULL REFERENCES resource_caches (id) ON DELETE RESTRICT,
    build_id          bigint NOT NULL,
    resource_id       bigint NULL,
    resource_type_id  bigint NULL,
    PRIMARY KEY (resource_cache_id, build_id)
);

CREATE TABLE containers (
    id          bigserial PRIMARY KEY,
    worker_name text NOT NULL REFERENCES workers (name) ON DELETE CASCADE,
    handle      text NOT NULL UNIQUE
);

CREATE TABLE volumes (
    id                           bigserial PRIMARY KEY,
    handle                       text NOT NULL UNIQUE,
    worker_name                  text NOT NULL REFERENCES workers (name) ON DELETE RESTRICT,
    state                        text NOT NULL DEFAULT 'creating'
        CHECK (state IN ('creating', 'created', 'initializing', 'initialized', 'destroying')),
    parent_id                    bigint NULL,
    parent_state                 text NULL,
    resource_cache_id            bigint NULL REFERENCES resource_caches (id) ON DELETE SET NULL,
    worker_base_resource_type_id bigint NULL REFERENCES worker_base_resource_types (id) ON DELETE SET NULL,
    container_id                 bigint NULL REFERENCES containers (id) ON DELETE SET NULL,
    created_at                   timestamptz NOT NULL DEFAULT now(),
    missing_since                timestamptz NULL,
    UNIQUE (id, state),
    CHECK ((parent_id IS NULL) = (parent_state IS NULL)),
    CONSTRAINT volumes_parent_fkey
    FOREIGN KEY (parent_id, parent_state) REFERENCES volumes (id, state)
        ON DELETE RESTRICT ON UPDATE NO ACTION DEFERRABLE INITIALLY IMMEDIATE
);

CREATE INDEX volumes_worker_name_idx ON volumes (worker_name);
CREATE INDEX volumes_parent_id_idx ON volumes (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX volumes_resource_cache_id_idx ON volumes (resource_cache_id) WHERE resource_cache_id IS NOT NULL;
CREATE INDEX volumes_worker_base_resource_type_id_idx ON volumes (worker_base_resource_type_id)
    WHERE worker_base_resource_type_id IS NOT NULL;
CREATE INDEX volumes_container_id_idx ON volumes (container_id) WHERE container_id IS NOT NULL;
-- The GC's candidates: garbage (no owner left) or missing from the worker.
CREATE INDEX volumes_garbage_idx ON volumes (id)
    WHERE resource_cache_id IS NULL AND worker_base_resource_type_id IS NULL
      AND container_id IS NULL AND state <> 'destroying';
CREATE INDEX volumes_missing_idx ON volumes (missing_since)
    WHERE missing_since IS NOT NULL AND state <> 'destroying';
CREATE INDEX containers_worker_name_idx ON containers (worker_name);
CREATE INDEX resource_caches_config_idx ON resource_caches (resource_config_id);
CREATE INDEX resource_configs_cache_idx ON resource_configs (resource_cache_id) WHERE resource_cache_id IS NOT NULL;

-- Per-worker revision: statement-level triggers with transition tables, so a GC pass that
-- marks thousands of volumes bumps each worker once per statement, not once per row.
CREATE FUNCTION volumes_bump_revision_ins() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE workers SET revision = revision + 1
     WHERE name IN (SELECT DISTINCT worker_name FROM new_rows);
    RETURN NULL;
END $$;

CREATE FUNCTION volumes_bump_revision_del() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE workers SET revision = revision + 1
     WHERE name IN (SELECT DISTINCT worker_name FROM old_rows);
    RETURN NULL;
END $$;

CREATE FUNCTION volumes_bump_revision_upd() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE workers SET revision = revision + 1
     WHERE name IN (SELECT n.worker_name FROM new_rows n JOIN old_rows o ON o.id = n.id
                     WHERE n.state IS DISTINCT FROM o.state
                        OR n.handle IS DISTINCT FROM o.handle
                        OR n.parent_id IS DISTINCT FROM o.parent_id
                        OR n.worker_name IS DISTINCT FROM o.worker_name
                    UNION
                    SELECT o.worker_name FROM new_rows n JOIN old_rows o ON o.id = n.id
                     WHERE n.worker_name IS DISTINCT FROM o.worker_name);
    RETURN NULL;
END $$;

CREATE TRIGGER volumes_revision_ins AFTER INSERT ON volumes
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION volumes_bump_revision_ins();
CREATE TRIGGER volumes_revision_del AFTER DELETE ON volumes
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION volumes_bump_revision_del();
CREATE TRIGGER volumes_revision_upd AFTER UPDATE ON volumes
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION volumes_bump_revision_upd();
