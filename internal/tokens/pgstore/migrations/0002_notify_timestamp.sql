-- Stamp every change notification with the time it was made, so replicas
-- can measure how long revocations take to reach them.
CREATE OR REPLACE FUNCTION extauthz.notify_key_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    sent_us bigint := (extract(epoch FROM clock_timestamp()) * 1000000)::bigint;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify('extauthz_keys', json_build_object('op', 'truncate', 'sent_us', sent_us)::text);
    ELSIF TG_OP = 'INSERT' THEN
        PERFORM pg_notify('extauthz_keys', json_build_object('op', 'insert', 'id', NEW.id, 'tenant', NEW.tenant_id, 'sent_us', sent_us)::text);
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('extauthz_keys', json_build_object('op', 'delete', 'id', OLD.id, 'tenant', OLD.tenant_id, 'sent_us', sent_us)::text);
    ELSE
        PERFORM pg_notify('extauthz_keys', json_build_object('op', 'update', 'id', OLD.id, 'tenant', OLD.tenant_id, 'sent_us', sent_us)::text);
    END IF;
    RETURN NULL;
END
$$;
