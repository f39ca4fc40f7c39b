-- Several mtad nodes on one PostgreSQL (issue 8).

-- Membership: a node registers at start, beats every cluster.heartbeat_interval and deletes its row on a
-- clean stop. A row whose heartbeat is older than cluster.dead_after belongs to a dead node.
CREATE TABLE nodes (
    id           text PRIMARY KEY,       -- the owner name on leases: host:pid:random
    host         text NOT NULL,
    pid          integer NOT NULL,
    started_at   timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL
);

-- Cluster-wide connection limits: an open outbound connection to a site holds one of its
-- `connection_limit` slots. The holder renews its slots with each heartbeat; a dead node's slots lapse
-- after cluster.dead_after (its TCP connections died with it).
CREATE TABLE connection_slots (
    site        text NOT NULL,
    slot        integer NOT NULL,
    node        text NOT NULL,
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (site, slot)
);
CREATE INDEX connection_slots_node_idx ON connection_slots (node);

-- A node that found every slot of a site taken asks the others to give back idle connections to it.
CREATE TABLE connection_slot_wants (
    site        text NOT NULL,
    node        text NOT NULL,
    wanted_at   timestamptz NOT NULL,
    PRIMARY KEY (site, node)
);

-- Shared backoff: a node throttled by a site (421, rate-limit replies) says so here; the others slow down
-- for that site at their next heartbeat.
CREATE TABLE site_throttles (
    site         text PRIMARY KEY,
    node         text NOT NULL,
    error        text,
    throttled_at timestamptz NOT NULL
);

-- Cluster-wide message rates: one token bucket per site; nodes take a few tokens at a time (a fraction of
-- a second's worth), so the sum of what all nodes send stays within `max_message_rate` however the
-- site's mail is spread over them.
CREATE TABLE site_rate_buckets (
    site        text PRIMARY KEY,
    tokens      double precision NOT NULL,
    granted     integer NOT NULL,           -- what the last take got (RETURNING sees only the new row)
    updated_at  timestamptz NOT NULL
);
