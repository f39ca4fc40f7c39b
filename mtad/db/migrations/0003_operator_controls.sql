-- Operator controls: paused destinations/tenants, and each node's view of its sites for `queue summary`.

CREATE TABLE queue_pauses (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    domain     text UNIQUE,
    tenant_id  bigint UNIQUE REFERENCES tenants (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((domain IS NULL) <> (tenant_id IS NULL))
);

CREATE TABLE site_status (
    node        text NOT NULL,
    site        text NOT NULL,
    provider    text,
    health      text NOT NULL,
    concurrency integer NOT NULL,
    in_flight   integer NOT NULL,
    pending     integer NOT NULL,
    rate_scale  double precision NOT NULL,
    dead_until  timestamptz,
    last_error  text,
    updated_at  timestamptz NOT NULL,
    PRIMARY KEY (node, site)
);
