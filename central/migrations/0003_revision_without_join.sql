-- The update trigger found the changed rows by joining its two transition tables on id.
-- Transition tables have no statistics, so the planner could pick a nested loop: a report
-- confirming 100,000 creates then compared 10^10 row pairs and ran for minutes, holding
-- the worker's rows locked. A symmetric difference (EXCEPT, hashed or sorted, never a
-- nested loop) finds the same workers in time linear in the rows updated: a row whose
-- desired-set columns changed appears in one of the two differences, and a row moved to
-- another worker appears in both, once under each worker's name.
CREATE OR REPLACE FUNCTION volumes_bump_revision_upd() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE workers SET revision = revision + 1
     WHERE name IN (SELECT d.worker_name FROM (
                        SELECT id, worker_name, state, handle, parent_id FROM new_rows
                        EXCEPT
                        SELECT id, worker_name, state, handle, parent_id FROM old_rows) d
                    UNION
                    SELECT d.worker_name FROM (
                        SELECT id, worker_name, state, handle, parent_id FROM old_rows
                        EXCEPT
                        SELECT id, worker_name, state, handle, parent_id FROM new_rows) d);
    RETURN NULL;
END $$;

-- A report changes few of the rows its present handles name: `creating` rows to confirm
-- and rows marked missing. These two indexes find exactly those rows of a worker, so the
-- report reads them instead of every row of the worker (300,000 on a large worker,
-- nearly none of them `creating` or missing) and matches the handles in memory.
CREATE INDEX volumes_creating_idx ON volumes (worker_name) WHERE state = 'creating';
CREATE INDEX volumes_missing_worker_idx ON volumes (worker_name) WHERE missing_since IS NOT NULL;
