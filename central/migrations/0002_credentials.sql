-- Identities: one row per issued credential. Only the SHA-256 of the token is stored
-- (see src/auth.rs for why a plain hash suffices for a 256-bit random token).

CREATE TABLE credentials (
    id           bigserial PRIMARY KEY,
    kind         text NOT NULL CHECK (kind IN ('worker', 'scheduler', 'operator')),
    -- The worker a worker credential speaks for; NULL for the other kinds.
    worker_name  text NULL REFERENCES workers (name) ON DELETE CASCADE,
    token_sha256 bytea NOT NULL UNIQUE CHECK (octet_length(token_sha256) = 32),
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- When a replica last checked the credential against the database (to the minute).
    last_used_at timestamptz NULL,
    revoked_at   timestamptz NULL,
    CHECK ((kind = 'worker') = (worker_name IS NOT NULL))
);

CREATE INDEX credentials_worker_name_idx ON credentials (worker_name) WHERE worker_name IS NOT NULL;
