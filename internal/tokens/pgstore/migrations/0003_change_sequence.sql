-- Every change of a key takes a number from one sequence: the row keeps it
-- as its version, a log keeps it for replicas that catch up, and the
-- notification carries it. Replicas stamp shared (Redis) entries with the
-- version they read and never adopt one older than a change they know of;
-- a replica whose LISTEN connection was lost reads what it missed from the
-- log instead of dropping its caches.
CREATE SEQUENCE extauthz.change_seq;

ALTER TABLE extauthz.keys ADD COLUMN version bigint NOT NULL DEFAULT 0;
UPDATE extauthz.keys SET version = nextval('extauthz.change_seq');

-- One row per change; key_id NULL for a TRUNCATE. Replicas prune rows
-- older than a day (at least twice their cache TTL + max stale).
CREATE TABLE extauthz.key_changes (
    seq    bigint PRIMARY KEY,
    key_id uuid,
    op     text NOT NULL,
    at     timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX key_changes_at ON extauthz.key_changes (at);

-- truncated: the sequence of the last TRUNCATE (no row older is in the
-- table); pruned_at: the log holds every change made after it.
CREATE TABLE extauthz.change_state (
    one        boolean PRIMARY KEY DEFAULT true CHECK (one),
    truncated  bigint NOT NULL DEFAULT 0,
    pruned_at  timestamptz NOT NULL DEFAULT 'epoch'
);
INSERT INTO extauthz.change_state DEFAULT VALUES;

CREATE FUNCTION extauthz.stamp_key_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.version := nextval('extauthz.change_seq');
    RETURN NEW;
END
$$;

-- The columns that decide; usage columns are left out.
CREATE TRIGGER keys_version
    BEFORE INSERT OR UPDATE OF id, tenant_id, kind, public_key, digest, pepper_id, scopes, expires_at, revoked_at
    ON extauthz.keys FOR EACH ROW EXECUTE FUNCTION extauthz.stamp_key_version();

CREATE OR REPLACE FUNCTION extauthz.notify_key_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    sent_us bigint := (extract(epoch FROM clock_timestamp()) * 1000000)::bigint;
    seq bigint;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        seq := nextval('extauthz.change_seq');
        UPDATE extauthz.change_state SET truncated = seq;
        INSERT INTO extauthz.key_changes (seq, key_id, op) VALUES (seq, NULL, 'truncate');
        PERFORM pg_notify('extauthz_keys', json_build_object('op', 'truncate', 'seq', seq, 'sent_us', sent_us)::text);
    ELSIF TG_OP = 'DELETE' THEN
        seq := nextval('extauthz.change_seq');
        INSERT INTO extauthz.key_changes (seq, key_id, op) VALUES (seq, OLD.id, 'delete');
        PERFORM pg_notify('extauthz_keys', json_build_object('op', 'delete', 'id', OLD.id, 'tenant', OLD.tenant_id, 'seq', seq, 'sent_us', sent_us)::text);
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO extauthz.key_changes (seq, key_id, op) VALUES (NEW.version, NEW.id, 'insert') ON CONFLICT DO NOTHING;
        PERFORM pg_notify('extauthz_keys', json_build_object('op', 'insert', 'id', NEW.id, 'tenant', NEW.tenant_id, 'seq', NEW.version, 'sent_us', sent_us)::text);
    ELSE
        INSERT INTO extauthz.key_changes (seq, key_id, op) VALUES (NEW.version, OLD.id, 'update') ON CONFLICT DO NOTHING;
        PERFORM pg_notify('extauthz_keys', json_build_object('op', 'update', 'id', OLD.id, 'tenant', OLD.tenant_id, 'seq', NEW.version, 'sent_us', sent_us)::text);
    END IF;
    RETURN NULL;
END
$$;
