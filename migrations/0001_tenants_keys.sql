CREATE TABLE IF NOT EXISTS tenants (
    id TEXT PRIMARY KEY,
    models TEXT NOT NULL,
    limits TEXT NOT NULL,
    budget TEXT,
    labels TEXT NOT NULL,
    disabled BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    name TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    prev_secret_sha256 TEXT,
    prev_valid_until BIGINT,
    models TEXT,
    limits TEXT,
    expires_at BIGINT,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT,
    disabled BIGINT NOT NULL DEFAULT 0,
    revoked_at BIGINT
);

CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys (tenant_id);

-- Bumped by every write; replicas poll it to drop their caches.
CREATE TABLE IF NOT EXISTS store_revision (
    id INTEGER PRIMARY KEY,
    n BIGINT NOT NULL
);
INSERT INTO store_revision (id, n) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
