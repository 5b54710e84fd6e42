-- extauthz keys: digests only, never a secret.
CREATE SCHEMA IF NOT EXISTS extauthz;

CREATE TABLE extauthz.keys (
    id            uuid PRIMARY KEY,
    tenant_id     text NOT NULL CHECK (tenant_id ~ '^[A-Za-z0-9._:-]{1,128}$'),
    name          text NOT NULL DEFAULT '',
    kind          text NOT NULL CHECK (kind IN ('pair', 'token')),
    public_key    text,
    -- HMAC-SHA256(pepper, secret) for pairs, (pepper, token) for tokens
    digest        bytea NOT NULL CHECK (octet_length(digest) = 32),
    pepper_id     text NOT NULL,
    scopes        text[] NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz,
    revoked_at    timestamptz,
    last_used_at  timestamptz,
    request_count bigint NOT NULL DEFAULT 0,
    CONSTRAINT keys_public_key_iff_pair CHECK ((kind = 'pair') = (public_key IS NOT NULL))
);

-- The two lookups of the hot path's miss.
CREATE UNIQUE INDEX keys_public_key ON extauthz.keys (public_key) WHERE public_key IS NOT NULL;
CREATE UNIQUE INDEX keys_token_digest ON extauthz.keys (digest) WHERE kind = 'token';
CREATE INDEX keys_tenant ON extauthz.keys (tenant_id, created_at);

-- Every change that can alter a decision is announced, whoever makes it
-- (the keys CLI or the application's own SQL). Usage columns are left out.
CREATE FUNCTION extauthz.notify_key_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify('extauthz_keys', json_build_object('op', 'truncate')::text);
    ELSIF TG_OP = 'INSERT' THEN
        PERFORM pg_notify('extauthz_keys', json_build_object('op', 'insert', 'id', NEW.id, 'tenant', NEW.tenant_id)::text);
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('extauthz_keys', json_build_object('op', 'delete', 'id', OLD.id, 'tenant', OLD.tenant_id)::text);
    ELSE
        PERFORM pg_notify('extauthz_keys', json_build_object('op', 'update', 'id', OLD.id, 'tenant', OLD.tenant_id)::text);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER keys_notify
    AFTER INSERT OR DELETE OR UPDATE OF id, tenant_id, kind, public_key, digest, pepper_id, scopes, expires_at, revoked_at
    ON extauthz.keys FOR EACH ROW EXECUTE FUNCTION extauthz.notify_key_change();

CREATE TRIGGER keys_notify_truncate
    AFTER TRUNCATE ON extauthz.keys FOR EACH STATEMENT EXECUTE FUNCTION extauthz.notify_key_change();
