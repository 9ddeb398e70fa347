-- The console: which keys may manage their tenant's keys in the tenant portal, and the audit
-- log of every change made through the console or the admin API (who, what, when).
ALTER TABLE api_keys ADD COLUMN manage_keys BIGINT NOT NULL DEFAULT 0;

CREATE TABLE audit_log (
    -- Sorts by time: 13 digits of unix milliseconds, then random characters.
    id TEXT PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL
);
