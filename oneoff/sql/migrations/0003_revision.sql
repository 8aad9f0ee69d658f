-- A counter bumped by every write to objects, so a reader can tell cheaply whether
-- what it loaded is still current (the reconciler keeps its last read while it is).
CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO counters (name, value) VALUES ('objects', 0);
