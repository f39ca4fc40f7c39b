-- Message class and list, suppressions, and the events of mail coming back (issue: bounces, complaints,
-- unsubscribes). Suppressions are per tenant: a tenant's lists are never visible to, or affected by, another.

ALTER TABLE tenants
    ADD COLUMN default_class text NOT NULL DEFAULT 'marketing' CHECK (default_class IN ('marketing', 'transactional'));

ALTER TABLE messages
    ADD COLUMN class   text NOT NULL DEFAULT 'marketing' CHECK (class IN ('marketing', 'transactional')),
    ADD COLUMN list_id text NOT NULL DEFAULT '';        -- '' when the tenant named no list

CREATE TABLE suppressions (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id  bigint NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    address    text NOT NULL CHECK (address = lower(address)),
    list_id    text NOT NULL DEFAULT '',              -- '' = every list of the tenant
    reason     text NOT NULL CHECK (reason IN ('unsubscribed', 'hard_bounce', 'complaint', 'manual')),
    source     text,                                   -- one_click, web, mailto, dsn, arf, operator, import
    detail     text,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, address, list_id, reason),
    CHECK (reason = 'unsubscribed' OR list_id = '')    -- only unsubscribes are per list
);

-- Unsubscribing cancels the recipient's still-queued marketing mail: find it without scanning the queue.
CREATE INDEX recipients_pending_address_idx ON recipients (tenant_id, lower(address))
    WHERE state IN ('queued', 'deferred');

ALTER TABLE events DROP CONSTRAINT events_kind_check;
ALTER TABLE events ADD CONSTRAINT events_kind_check CHECK (kind IN
    ('delivered', 'deferred', 'bounced', 'expired', 'released', 'reclaimed', 'suppressed', 'cancelled',
     'unsubscribed', 'complained', 'dsn', 'auto_reply'));
ALTER TABLE events ADD COLUMN category text;    -- bounce category (invalid_recipient, mailbox_full, ...)
ALTER TABLE events ADD COLUMN source text;      -- how an unsubscribe or complaint arrived
CREATE INDEX events_at_idx ON events (at);
