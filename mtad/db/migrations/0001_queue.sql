-- Tenants, messages stored once, one row per recipient with its own state, and the event log.
-- The recipient states mirror mtad.model.RecipientState (a test keeps the CHECK and the enum equal).

CREATE TABLE tenants (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          text NOT NULL UNIQUE CHECK (name ~ '^[a-z0-9][a-z0-9._-]{0,62}$'),
    password_hash text NOT NULL,            -- argon2id, salted; never the password
    disabled      boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- A sending domain belongs to exactly one tenant: no tenant can send as another tenant's domain.
CREATE TABLE tenant_domains (
    domain     text PRIMARY KEY CHECK (domain = lower(domain)),
    tenant_id  bigint NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tenant_domains_tenant_idx ON tenant_domains (tenant_id);

CREATE TABLE messages (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue_id    text NOT NULL UNIQUE,
    tenant_id   bigint NOT NULL REFERENCES tenants (id),
    mail_from   text NOT NULL,
    size_bytes  integer NOT NULL,
    smtputf8    boolean NOT NULL DEFAULT false,
    client_ip   text,                        -- masked: last IPv4 octet / beyond the IPv6 /48 zeroed
    received_at timestamptz NOT NULL,
    body        bytea NOT NULL
);

CREATE TABLE recipients (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id       bigint NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    tenant_id        bigint NOT NULL,       -- copied from the message: summaries and suppression need no join
    address          text NOT NULL,
    domain           text NOT NULL,         -- ASCII (A-label) form
    state            text NOT NULL DEFAULT 'queued' CHECK (state IN
                         ('queued', 'active', 'deferred', 'delivered', 'bounced', 'expired', 'suppressed', 'cancelled')),
    attempts         integer NOT NULL DEFAULT 0,
    queued_at        timestamptz NOT NULL,
    next_attempt_at  timestamptz NOT NULL,
    lease_owner      text,
    lease_expires_at timestamptz,
    last_code        integer,
    last_enhanced    text,
    last_reply       text,
    updated_at       timestamptz NOT NULL,
    CHECK ((state = 'active') = (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL))
) WITH (fillfactor = 80);              -- room for HOT updates: a recipient row changes state a few times

-- The claim's index: only due-able rows are in it, so its size follows the live queue, not the history.
CREATE INDEX recipients_due_idx ON recipients (next_attempt_at) WHERE state IN ('queued', 'deferred');
-- Reclaiming expired leases looks only at active rows.
CREATE INDEX recipients_lease_idx ON recipients (lease_expires_at) WHERE state = 'active';
CREATE INDEX recipients_message_idx ON recipients (message_id);

CREATE TABLE events (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at           timestamptz NOT NULL,
    kind         text NOT NULL CHECK (kind IN
                     ('delivered', 'deferred', 'bounced', 'expired', 'released', 'reclaimed',
                      'suppressed', 'cancelled')),
    tenant_id    bigint NOT NULL,
    message_id   bigint NOT NULL,
    recipient_id bigint,
    code         integer,
    enhanced     text,
    reply        text
);
CREATE INDEX events_message_idx ON events (message_id);
CREATE INDEX events_recipient_idx ON events (recipient_id);

-- Wake claimers when new recipients arrive. A hint only: claimers poll as well.
CREATE FUNCTION mtad_notify_queue() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('mtad_queue', '');
    RETURN NULL;
END $$;
CREATE TRIGGER recipients_notify AFTER INSERT ON recipients
    FOR EACH STATEMENT EXECUTE FUNCTION mtad_notify_queue();
