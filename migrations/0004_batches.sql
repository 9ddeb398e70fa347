-- The Batch API: uploaded files (contents in the blob store), batches, and one row per
-- batch line with its lease (which replica runs it, until when) and, once run, its output
-- line. A line leaves `pending` exactly once for `done`, `expired` or `cancelled`; a
-- replica that dies leaves `leased` rows whose lease expires and another takes them.
CREATE TABLE files (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX files_by_tenant ON files (tenant, created_at);

CREATE TABLE batches (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    principal TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    status TEXT NOT NULL,
    metadata TEXT,
    errors TEXT,
    output_file_id TEXT,
    error_file_id TEXT,
    total BIGINT NOT NULL DEFAULT 0,
    completed BIGINT NOT NULL DEFAULT 0,
    failed BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    in_progress_at BIGINT,
    finalizing_at BIGINT,
    completed_at BIGINT,
    failed_at BIGINT,
    expired_at BIGINT,
    cancelling_at BIGINT,
    cancelled_at BIGINT
);
CREATE INDEX batches_by_tenant ON batches (tenant, created_at);
CREATE INDEX batches_by_status ON batches (status);

CREATE TABLE batch_lines (
    batch_id TEXT NOT NULL,
    line BIGINT NOT NULL,
    custom_id TEXT NOT NULL,
    body TEXT NOT NULL,
    state TEXT NOT NULL,
    lease_owner TEXT,
    lease_until BIGINT,
    status_code BIGINT,
    result TEXT,
    PRIMARY KEY (batch_id, line)
);
CREATE INDEX batch_lines_by_state ON batch_lines (state, lease_until);
