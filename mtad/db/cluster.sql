-- Named queries of the cluster (membership, shared connection slots, shared backoff); see queries.sql.

-- beat --
-- Register or renew this node and the connection slots it holds ($6, $7: sites and slot numbers); a slot
-- it lost track of is not renewed and lapses. The answer: the number of live nodes, and the database's clock.
WITH me AS (
    INSERT INTO nodes (id, host, pid, started_at, heartbeat_at) VALUES ($1, $2, $3, $4, now())
    ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()
), renewed AS (
    UPDATE connection_slots AS c SET expires_at = now() + $5::interval
    FROM unnest($6::text[], $7::integer[]) AS h (site, slot)
    WHERE c.node = $1 AND c.site = h.site AND c.slot = h.slot
)
SELECT 1 + count(*) AS live, now() AS at FROM nodes WHERE id <> $1 AND heartbeat_at > now() - $5::interval;

-- leave --
-- A clean stop: this node's slots and wishes go at once, so the others need not wait for them to lapse.
WITH slots AS (DELETE FROM connection_slots WHERE node = $1),
     wants AS (DELETE FROM connection_slot_wants WHERE node = $1)
DELETE FROM nodes WHERE id = $1;

-- forget_dead_nodes --
-- Dead nodes stay listed (for `mtad nodes`) for a day; their lapsed slots and wishes go.
WITH slots AS (DELETE FROM connection_slots WHERE expires_at < now()),
     wants AS (DELETE FROM connection_slot_wants WHERE wanted_at < now() - $2::interval)
DELETE FROM nodes WHERE heartbeat_at < now() - $1::interval;

-- take_slot --
-- One free slot of the site's `connection_limit` ($3), or none. Two nodes that pick the same free slot
-- conflict on the primary key; the loser gets no slot but `free` true, and tries again. `free` false: every
-- slot is held, and trying again at once would only cost another statement.
WITH free AS (
    SELECT s AS slot FROM generate_series(0, $3 - 1) AS s
    WHERE NOT EXISTS (
        SELECT 1 FROM connection_slots AS c WHERE c.site = $1 AND c.slot = s AND c.expires_at > now()
    )
    ORDER BY s LIMIT 1
), taken AS (
    INSERT INTO connection_slots (site, slot, node, expires_at)
    SELECT $1, free.slot, $2, now() + $4::interval FROM free
    ON CONFLICT (site, slot) DO UPDATE SET node = EXCLUDED.node, expires_at = EXCLUDED.expires_at
        WHERE connection_slots.expires_at <= now()
    RETURNING slot
)
SELECT (SELECT slot FROM taken) AS slot, EXISTS (SELECT 1 FROM free) AS free;

-- give_slots --
-- Connections closed: their slots are free for any node.
DELETE FROM connection_slots AS c
USING unnest($2::text[], $3::integer[]) AS g (site, slot)
WHERE c.node = $1 AND c.site = g.site AND c.slot = g.slot;

-- want_slot --
-- Every slot of the site is taken: ask the other nodes to close idle connections to it.
INSERT INTO connection_slot_wants (site, node, wanted_at) VALUES ($1, $2, now())
ON CONFLICT (site, node) DO UPDATE SET wanted_at = now();

-- slot_wants --
-- Sites other nodes want a slot of, recently, where this node holds slots.
SELECT DISTINCT w.site FROM connection_slot_wants AS w
JOIN connection_slots AS c ON c.site = w.site AND c.node = $1
WHERE w.node <> $1 AND w.wanted_at > now() - $2::interval;

-- throttled --
-- This node was throttled by the site: the others back off too.
INSERT INTO site_throttles (site, node, error, throttled_at) VALUES ($1, $2, $3, now())
ON CONFLICT (site) DO UPDATE SET node = EXCLUDED.node, error = EXCLUDED.error, throttled_at = now();

-- throttles_since --
-- Throttles other nodes met after `since` (the newest seen so far).
SELECT site, error, throttled_at FROM site_throttles WHERE node <> $1 AND throttled_at > $2;

-- cluster_nodes --
-- `mtad nodes`: every node with its heartbeat age, leased recipients and connection slots.
SELECT n.id, n.host, n.pid, n.started_at, n.heartbeat_at,
       extract(epoch FROM now() - n.heartbeat_at) AS silent_s,
       (SELECT count(*) FROM recipients AS r WHERE r.state = 'active' AND r.lease_owner = n.id) AS leased,
       (SELECT count(*) FROM connection_slots AS c WHERE c.node = n.id AND c.expires_at > now()) AS slots
FROM nodes AS n ORDER BY n.started_at, n.id;

-- silent_nodes_on_host --
-- Nodes registered from this host that have missed a few heartbeats: candidates for `reap_node` once
-- the local process table confirms their process is gone.
SELECT id, pid FROM nodes WHERE host = $1 AND id <> $2 AND heartbeat_at < now() - $3::interval;

-- reap_node --
-- A node known to be dead (its process is gone): its slots, wishes and row go at once, and its leased
-- recipients go back to the queue now rather than when their lease would have run out. Two siblings that
-- reap it at once serialise on its row: only the one that deleted it reports `reaped`.
WITH slots AS (DELETE FROM connection_slots WHERE node = $1),
     wants AS (DELETE FROM connection_slot_wants WHERE node = $1),
     gone AS (DELETE FROM nodes WHERE id = $1 RETURNING id),
     released AS (
    UPDATE recipients AS r
    SET state = CASE WHEN r.attempts = 0 THEN 'queued' ELSE 'deferred' END,
        lease_owner = NULL, lease_expires_at = NULL, next_attempt_at = now(), updated_at = now()
    WHERE r.state = 'active' AND r.lease_owner = $1
    RETURNING r.id, r.message_id, r.tenant_id
), logged AS (
    INSERT INTO events (at, kind, tenant_id, message_id, recipient_id)
    SELECT now(), 'reclaimed', tenant_id, message_id, id FROM released
)
SELECT EXISTS (SELECT 1 FROM gone) AS reaped, (SELECT count(*) FROM released) AS released;

-- take_rate_tokens --
-- Up to $4 tokens of the site's bucket (refilled at $2 per second, at most $3 held). Two nodes taking at
-- once serialise on the row; a clock read before the other's update refills nothing (greatest(0, ...)).
INSERT INTO site_rate_buckets AS b (site, tokens, granted, updated_at)
VALUES ($1, $3 - least($4, floor($3)), least($4, floor($3)), now())
ON CONFLICT (site) DO UPDATE SET
    granted = least($4, floor(least($3, b.tokens + greatest(0, extract(epoch FROM now() - b.updated_at)) * $2))),
    tokens = least($3, b.tokens + greatest(0, extract(epoch FROM now() - b.updated_at)) * $2)
             - least($4, floor(least($3, b.tokens + greatest(0, extract(epoch FROM now() - b.updated_at)) * $2))),
    updated_at = greatest(b.updated_at, now())
RETURNING granted;
