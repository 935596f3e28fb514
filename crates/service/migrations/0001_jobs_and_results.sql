-- Portable SQL: SQLite and PostgreSQL run this same file.

-- Every job a node accepted. `document` is the job as GET /jobs/{id} shows it (JSON); the other
-- columns are what the store selects and orders by. Times are Unix milliseconds.
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    state TEXT NOT NULL,
    request TEXT NOT NULL,
    cache_key TEXT NOT NULL,
    document TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX jobs_by_node_and_state ON jobs (node, state, created_at);
CREATE INDEX jobs_by_update ON jobs (updated_at);

-- Finished results by cache key (the normalised job and the device's identity), shared by every
-- node of the store unless a node keys its results privately.
CREATE TABLE results (
    cache_key TEXT PRIMARY KEY,
    result TEXT NOT NULL,
    measured_on TEXT NOT NULL,
    measured_at BIGINT NOT NULL
);
CREATE INDEX results_by_age ON results (measured_at);
