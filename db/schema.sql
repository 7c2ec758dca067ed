-- ThoughtSweep storage, migration 1 (DESIGN.md section 5). Later changes are new migrations in
-- db/migrations.py, never edits of this file: a database records which migrations it has run.

CREATE SEQUENCE IF NOT EXISTS run_ids START 1;

CREATE TABLE IF NOT EXISTS runs (
    id                INTEGER PRIMARY KEY DEFAULT nextval('run_ids'),
    name              TEXT NOT NULL,
    created           TIMESTAMP NOT NULL DEFAULT current_timestamp,
    model             TEXT NOT NULL,
    dataset           TEXT NOT NULL,
    config            JSON NOT NULL,          -- asdict(SweepConfig)
    source            TEXT NOT NULL DEFAULT 'sweep',  -- sweep | import
    status            TEXT NOT NULL,          -- running | finished | stopped | interrupted | failed
    phase             TEXT,                   -- validation | full | reference | NULL before start
    num_latent        INTEGER NOT NULL DEFAULT 6,
    n_variants        INTEGER NOT NULL DEFAULT 1,
    done              INTEGER NOT NULL DEFAULT 0,   -- problems with every variant stored
    total             INTEGER NOT NULL DEFAULT 0,
    started           TIMESTAMP,
    finished          TIMESTAMP,
    elapsed_s         DOUBLE NOT NULL DEFAULT 0,    -- time spent sweeping, summed over resumes
    problems_per_hour DOUBLE,
    peak_rss_mb       DOUBLE,
    peak_gpu_mb       DOUBLE,
    batch_size        INTEGER,                -- problems per batch in use (auto may change it)
    device            TEXT,
    pid               INTEGER,                -- process running it, while status = running
    host              TEXT,
    error             TEXT,
    notes             TEXT NOT NULL DEFAULT '',
    tags              TEXT NOT NULL DEFAULT ''
);

CREATE TABLE IF NOT EXISTS problems (
    run_id      INTEGER NOT NULL,
    problem_id  TEXT NOT NULL,
    ord         INTEGER NOT NULL,             -- order in the run: resume and exports follow it
    question    TEXT NOT NULL,
    gold        TEXT NOT NULL,
    gold_value  DOUBLE,
    difficulty  INTEGER NOT NULL,
    solution    TEXT NOT NULL DEFAULT '',
    phase       TEXT NOT NULL,                -- validation | full
    PRIMARY KEY (run_id, problem_id)
);

CREATE TABLE IF NOT EXISTS results (
    run_id        INTEGER NOT NULL,
    problem_id    TEXT NOT NULL,
    variant       TEXT NOT NULL,              -- Variant.key: 'prefix:3/zero/latent/recompute'
    scheme        TEXT NOT NULL,              -- baseline | prefix | single | suffix | exit
    k             INTEGER NOT NULL,
    method        TEXT NOT NULL,
    site          TEXT NOT NULL,
    mode          TEXT NOT NULL,
    answer_text   TEXT,
    answer_value  DOUBLE,
    extraction    TEXT,                       -- codi | hash | explicit | fallback | none
    correct       BOOLEAN NOT NULL,
    changed       BOOLEAN NOT NULL,           -- answer differs from this problem's baseline
    flip          BOOLEAN NOT NULL,           -- baseline_correct != correct (the seed's importance_score)
    harm          BOOLEAN NOT NULL,           -- baseline right, variant wrong
    help          BOOLEAN NOT NULL,           -- baseline wrong, variant right
    gold_logprob  DOUBLE,
    logprob_drop  DOUBLE,                     -- baseline gold_logprob - this gold_logprob
    lens          JSON,                       -- per latent: top-k logit-lens [[token, prob], ...]
    PRIMARY KEY (run_id, problem_id, variant)
);

CREATE TABLE IF NOT EXISTS run_metrics (
    run_id            INTEGER NOT NULL,
    t                 TIMESTAMP NOT NULL DEFAULT current_timestamp,
    elapsed_s         DOUBLE NOT NULL,
    phase             TEXT,
    done              INTEGER NOT NULL,
    batch_problems    INTEGER,
    batch_size        INTEGER,
    problems_per_hour DOUBLE,
    rss_mb            DOUBLE,
    cpu_pct           DOUBLE,
    gpu_mem_mb        DOUBLE,
    gpu_peak_mb       DOUBLE
);

-- Baseline values at a site over the run's reference problems, for mean / noise / resample.
CREATE TABLE IF NOT EXISTS reference_latents (
    run_id       INTEGER NOT NULL,
    site         TEXT NOT NULL,
    problem_ids  JSON NOT NULL,
    shape        JSON NOT NULL,               -- [N, T, d]
    data         BLOB NOT NULL,               -- float32, C order
    PRIMARY KEY (run_id, site)
);
