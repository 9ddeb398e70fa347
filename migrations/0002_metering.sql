-- Budgets: one row per scope (tenant:<id> or key:<id>) and period (2026-11-25, 2026-11, total).
-- `held` is reserved by requests in flight; `spent` is settled. A reservation is one
-- conditional UPDATE: held = held + cost WHERE spent + held + cost <= budget.
CREATE TABLE IF NOT EXISTS budget_usage (
    scope TEXT NOT NULL,
    period TEXT NOT NULL,
    spent BIGINT NOT NULL DEFAULT 0,
    held BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, period)
);

-- Holds in budget_usage.held, one row each (PostgreSQL), so that the holds of a replica that
-- died (kill -9) are given back when their lease runs out, by whichever replica sweeps first.
CREATE TABLE IF NOT EXISTS budget_holds (
    member TEXT NOT NULL,
    scope TEXT NOT NULL,
    period TEXT NOT NULL,
    amount BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (member, scope)
);
CREATE INDEX IF NOT EXISTS budget_holds_expiry ON budget_holds (expires_at);

-- The usage ledger: one row per relayed request, written in the same transaction that settles
-- its budget reservation (group commit). Ids start with the time, so inserts append to the
-- primary key's last pages instead of dirtying a random page per row.
CREATE TABLE IF NOT EXISTS usage_ledger (
    id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    ts_ms BIGINT NOT NULL,
    tenant TEXT NOT NULL,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    backend TEXT,
    size TEXT NOT NULL,
    quality TEXT,
    n_requested BIGINT NOT NULL,
    n_delivered BIGINT NOT NULL,
    reserved_micro_usd BIGINT NOT NULL,
    cost_micro_usd BIGINT NOT NULL,
    upstream_cost_micro_usd BIGINT NOT NULL,
    input_tokens BIGINT,
    output_tokens BIGINT,
    status BIGINT NOT NULL,
    latency_ms BIGINT NOT NULL,
    idempotency_key TEXT
);
CREATE INDEX IF NOT EXISTS usage_ledger_ts ON usage_ledger (ts_ms);
CREATE INDEX IF NOT EXISTS usage_ledger_tenant_ts ON usage_ledger (tenant, ts_ms);

-- Idempotency-Key records: `running` while the first request runs (until locked_until), then
-- `done` with the answer, replayed to repeats until created_at + retention.
CREATE TABLE IF NOT EXISTS idempotency (
    tenant TEXT NOT NULL,
    idem_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL,
    response TEXT,
    locked_until BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, idem_key)
);
