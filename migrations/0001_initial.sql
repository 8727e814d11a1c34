-- casstore index, schema 1.  Released files are never edited: add 0002_*.sql.
-- The objects on disk are the truth; these tables are metadata about them.

CREATE TABLE objects (
    sha256    TEXT PRIMARY KEY,            -- 64 lowercase hex, the object's name
    size      INTEGER NOT NULL,
    blake3    TEXT,                        -- recorded at ingest, for verify --fast
    md5       TEXT,                        -- when a caller asked for it (conda)
    created   REAL NOT NULL,               -- unix seconds
    last_used REAL NOT NULL,               -- unix seconds, coarsened to 1 s
    pinned    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX objects_last_used ON objects (last_used);

-- Where an object came from; the URL is stored with credentials redacted.
CREATE TABLE sources (
    url           TEXT PRIMARY KEY,
    sha256        TEXT NOT NULL REFERENCES objects (sha256) ON DELETE CASCADE,
    etag          TEXT,
    last_modified TEXT,
    recorded      REAL NOT NULL
);
CREATE INDEX sources_sha256 ON sources (sha256);

CREATE TABLE names (
    name     TEXT PRIMARY KEY,
    sha256   TEXT NOT NULL REFERENCES objects (sha256) ON DELETE CASCADE,
    recorded REAL NOT NULL
);
CREATE INDEX names_sha256 ON names (sha256);

-- Materialized destinations; live while path still has (device, inode).
CREATE TABLE links (
    path     TEXT PRIMARY KEY,
    device   INTEGER NOT NULL,
    inode    INTEGER NOT NULL,
    sha256   TEXT NOT NULL REFERENCES objects (sha256) ON DELETE CASCADE,
    method   TEXT NOT NULL,
    recorded REAL NOT NULL
);
CREATE INDEX links_sha256 ON links (sha256);
