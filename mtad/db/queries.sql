-- Named queries, loaded by mtad.db.queries: a block starts with `-- name --`, then a one-line why, then SQL.
-- The name is the method of the store that runs it.

-- insert_submissions --
-- Several messages (those that arrived together: group commit) and all their recipients in one statement,
-- hence one transaction: all stored or nothing. Recipients name their message by queue id.
-- A recipient suppressed for this tenant (unsubscribed marketing, hard bounce, complaint) is stored as
-- 'suppressed' and never attempted; the statement returns those addresses with the reason.
WITH message AS (
    INSERT INTO messages (queue_id, tenant_id, mail_from, size_bytes, smtputf8, client_ip, received_at, body, class,
                          list_id)
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::integer[], $5::boolean[], $6::text[],
                         $7::timestamptz[], $8::bytea[], $9::text[], $10::text[])
    RETURNING id, queue_id, tenant_id, received_at, class, list_id
), incoming AS (
    SELECT m.id AS message_id, m.queue_id, m.tenant_id, m.received_at, r.address, r.domain,
           (SELECT s.reason FROM suppressions AS s
            WHERE s.tenant_id = m.tenant_id AND s.address = lower(r.address)
              AND (s.reason <> 'unsubscribed' OR (m.class = 'marketing' AND s.list_id IN ('', m.list_id)))
            ORDER BY s.reason LIMIT 1) AS suppressed_because
    FROM unnest($11::text[], $12::text[], $13::text[]) AS r (queue_id, address, domain)
    JOIN message AS m ON m.queue_id = r.queue_id
), stored AS (
    INSERT INTO recipients (message_id, tenant_id, address, domain, state, queued_at, next_attempt_at, updated_at)
    SELECT i.message_id, i.tenant_id, i.address, i.domain,
           CASE WHEN i.suppressed_because IS NULL THEN 'queued' ELSE 'suppressed' END,
           i.received_at, i.received_at, i.received_at
    FROM incoming AS i
    RETURNING id, message_id, tenant_id, address, state
), suppressed_events AS (
    INSERT INTO events (at, kind, tenant_id, message_id, recipient_id, reply)
    SELECT i.received_at, 'suppressed', s.tenant_id, s.message_id, s.id, 'suppressed: ' || i.suppressed_because
    FROM stored AS s JOIN incoming AS i ON i.message_id = s.message_id AND i.address = s.address
    WHERE s.state = 'suppressed'
)
SELECT i.queue_id, i.address, i.suppressed_because FROM incoming AS i WHERE i.suppressed_because IS NOT NULL;

-- claim_due --
-- Lease a batch of due recipients; SKIP LOCKED lets several claimers (and nodes) share the queue.
-- Suppressed since they were queued (an unsubscribe, a hard bounce): marked so in the same statement,
-- never handed to delivery. Paused domains and tenants are skipped.
-- Each recipient's message is looked up by primary key in a LATERAL subquery that OFFSET 0 keeps from being
-- flattened into a join: the plan (kept for the connection's life, mtad.db.pool) then has one shape however
-- small the tables were when it was made.
WITH due AS (
    SELECT r.id, m.queue_id, m.mail_from, m.class, m.list_id,
           EXISTS (SELECT 1 FROM suppressions AS s
                   WHERE s.tenant_id = r.tenant_id AND s.address = lower(r.address)
                     AND (s.reason <> 'unsubscribed' OR (m.class = 'marketing' AND s.list_id IN ('', m.list_id))))
               AS suppressed
    FROM recipients AS r
    CROSS JOIN LATERAL (SELECT queue_id, mail_from, class, list_id FROM messages WHERE id = r.message_id OFFSET 0) AS m
    WHERE r.state IN ('queued', 'deferred') AND r.next_attempt_at <= $1
      AND NOT EXISTS (SELECT 1 FROM queue_pauses AS p WHERE p.domain = r.domain OR p.tenant_id = r.tenant_id)
    ORDER BY r.next_attempt_at
    LIMIT $2
    FOR UPDATE OF r SKIP LOCKED
), suppressed AS (
    UPDATE recipients AS r SET state = 'suppressed', updated_at = $1
    FROM due WHERE r.id = due.id AND due.suppressed
    RETURNING r.id, r.message_id, r.tenant_id
), suppressed_events AS (
    INSERT INTO events (at, kind, tenant_id, message_id, recipient_id, reply)
    SELECT $1, 'suppressed', tenant_id, message_id, id, 'suppressed after it was queued' FROM suppressed
)
UPDATE recipients AS r
SET state = 'active', lease_owner = $3, lease_expires_at = $1 + make_interval(secs => $4), updated_at = $1
FROM due
WHERE r.id = due.id AND NOT due.suppressed
RETURNING r.id, r.message_id, due.queue_id, r.tenant_id, due.mail_from, r.address, r.domain, r.attempts,
          r.queued_at, r.lease_expires_at, due.class, due.list_id;

-- record_outcomes --
-- Finish attempts: only rows still leased by this owner change, so a node that lost its lease changes nothing
-- (a lease owner implies state 'active': the table's CHECK). The rows are found by primary key (`id = ANY`),
-- never through the lease index: a generic plan made on a small table would scan every leased row.
-- A hard bounce (the address itself is bad) suppresses the address for the tenant in the same statement.
WITH outcome AS (
    SELECT * FROM unnest($2::bigint[], $3::text[], $4::timestamptz[], $5::integer[], $6::text[], $7::text[],
                         $9::text[], $10::text[], $11::text[], $12::integer[], $13::text[], $14::boolean[])
        AS o (recipient_id, state, next_attempt_at, code, enhanced, reply, site, mx_host, tls_version, duration_ms,
              category, hard)
), finished AS (
    UPDATE recipients AS r
    SET state = o.state, attempts = r.attempts + CASE WHEN o.state = 'cancelled' THEN 0 ELSE 1 END,
        lease_owner = NULL, lease_expires_at = NULL,
        next_attempt_at = coalesce(o.next_attempt_at, r.next_attempt_at),
        last_code = o.code, last_enhanced = o.enhanced, last_reply = o.reply, updated_at = $8
    FROM outcome AS o
    WHERE r.id = ANY ($2::bigint[]) AND r.id = o.recipient_id AND r.lease_owner = $1
    RETURNING r.id, r.message_id, r.tenant_id, r.address, r.state, o.code, o.enhanced, o.reply, o.site, o.mx_host,
              o.tls_version, o.duration_ms, o.category, o.hard
), hard_bounces AS (
    INSERT INTO suppressions (tenant_id, address, list_id, reason, source, detail)
    SELECT DISTINCT tenant_id, lower(address), '', 'hard_bounce', 'smtp', code || ' ' || coalesce(enhanced, '')
    FROM finished WHERE state = 'bounced' AND hard
    ON CONFLICT DO NOTHING
)
INSERT INTO events (at, kind, tenant_id, message_id, recipient_id, code, enhanced, reply, site, mx_host,
                    tls_version, duration_ms, category)
SELECT $8, state, tenant_id, message_id, id, code, enhanced, reply, site, mx_host, tls_version, duration_ms, category
FROM finished
RETURNING recipient_id;

-- release_owner --
-- A clean stop: everything still leased by this owner goes back, including claims a cancelled claim loop
-- never handed to the scheduler.
WITH released AS (
    UPDATE recipients
    SET state = CASE WHEN attempts = 0 THEN 'queued' ELSE 'deferred' END,
        lease_owner = NULL, lease_expires_at = NULL, updated_at = $2
    WHERE state = 'active' AND lease_owner = $1
    RETURNING id, message_id, tenant_id
)
INSERT INTO events (at, kind, tenant_id, message_id, recipient_id)
SELECT $2, 'released', tenant_id, message_id, id FROM released
RETURNING recipient_id;

-- extend_leases --
-- Recipients this owner still holds (waiting in memory or in flight) keep their lease: a long attempt or a
-- database outage must not let the lease run out under us and a second claim deliver them again.
UPDATE recipients SET lease_expires_at = $3::timestamptz + make_interval(secs => $4::double precision)
WHERE id = ANY ($1::bigint[]) AND lease_owner = $2;

-- postpone --
-- Give leases back without an attempt, each recipient due again at its own time: what a site cannot send
-- within the horizon (at its rate, or at the speed of its connections), in the order it will get to it
-- (mtad.schedule.engine). No event: nothing happened to the recipient, and a campaign's backlog would write
-- one per recipient.
UPDATE recipients AS r
SET state = CASE WHEN r.attempts = 0 THEN 'queued' ELSE 'deferred' END,
    lease_owner = NULL, lease_expires_at = NULL, updated_at = $2, next_attempt_at = p.at
FROM unnest($3::bigint[], $4::timestamptz[]) AS p (id, at)
WHERE r.id = ANY ($3::bigint[]) AND r.id = p.id AND r.lease_owner = $1;

-- release --
-- Give leases back without an attempt (shutdown, held too long in memory), due again at $4 if given.
WITH released AS (
    UPDATE recipients
    SET state = CASE WHEN attempts = 0 THEN 'queued' ELSE 'deferred' END,
        lease_owner = NULL, lease_expires_at = NULL, updated_at = $3,
        next_attempt_at = coalesce($4::timestamptz, next_attempt_at)
    WHERE id = ANY ($1::bigint[]) AND lease_owner = $2
    RETURNING id, message_id, tenant_id
)
INSERT INTO events (at, kind, tenant_id, message_id, recipient_id)
SELECT $3, 'released', tenant_id, message_id, id FROM released
RETURNING recipient_id;

-- reclaim_expired --
-- Leases of a node that died (or stalled past its lease) go back to the queue, due now.
WITH expired AS (
    SELECT id FROM recipients
    WHERE state = 'active' AND lease_expires_at < $1
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), reclaimed AS (
    UPDATE recipients AS r
    SET state = CASE WHEN r.attempts = 0 THEN 'queued' ELSE 'deferred' END,
        lease_owner = NULL, lease_expires_at = NULL, next_attempt_at = $1, updated_at = $1
    FROM expired
    WHERE r.id = expired.id
    RETURNING r.id, r.message_id, r.tenant_id
)
INSERT INTO events (at, kind, tenant_id, message_id, recipient_id)
SELECT $1, 'reclaimed', tenant_id, message_id, id FROM reclaimed
RETURNING recipient_id;

-- load_messages --
-- The stored messages of a claimed batch in one round trip (instead of one per message).
SELECT id, queue_id, tenant_id, mail_from, smtputf8, body, class, list_id FROM messages WHERE id = ANY ($1::bigint[]);

-- load_message --
-- The stored message for delivery: envelope sender and body.
SELECT id, queue_id, tenant_id, mail_from, smtputf8, body, class, list_id FROM messages WHERE id = $1;

-- tenant_by_name --
-- One tenant with its password hash and sending domains, for AUTH and trusted networks.
SELECT t.id, t.name, t.password_hash, t.disabled, t.default_class,
       coalesce(array_agg(d.domain ORDER BY d.domain) FILTER (WHERE d.domain IS NOT NULL), '{}') AS domains
FROM tenants AS t LEFT JOIN tenant_domains AS d ON d.tenant_id = t.id
WHERE t.name = $1
GROUP BY t.id;

-- insert_tenant --
-- A new tenant; its name is its SMTP login.
INSERT INTO tenants (name, password_hash) VALUES ($1, $2) RETURNING id;

-- set_tenant_password --
-- Replace a tenant's password hash.
UPDATE tenants SET password_hash = $2 WHERE name = $1 RETURNING id;

-- set_tenant_default_class --
-- The class a tenant's mail has when it sends no X-Mtad-Class header.
UPDATE tenants SET default_class = $2 WHERE name = $1 RETURNING id;

-- list_tenants --
-- Every tenant with its sending domains, for operators.
SELECT t.id, t.name, t.disabled, t.created_at, t.default_class,
       coalesce(array_agg(d.domain ORDER BY d.domain) FILTER (WHERE d.domain IS NOT NULL), '{}') AS domains
FROM tenants AS t LEFT JOIN tenant_domains AS d ON d.tenant_id = t.id
GROUP BY t.id ORDER BY t.name;

-- add_tenant_domain --
-- Give a sending domain to a tenant; fails (unique) if another tenant already owns it.
INSERT INTO tenant_domains (domain, tenant_id) SELECT $2, id FROM tenants WHERE name = $1 RETURNING tenant_id;

-- remove_tenant_domain --
-- Take a sending domain away from a tenant.
DELETE FROM tenant_domains WHERE domain = $2 AND tenant_id = (SELECT id FROM tenants WHERE name = $1)
RETURNING domain;

-- count_by_state --
-- Queue summary: recipients by state.
SELECT state, count(*) AS recipients FROM recipients GROUP BY state ORDER BY state;

-- count_pending_by_domain --
-- Queue summary: the destination domains with the most recipients still to deliver.
SELECT domain, count(*) AS recipients,
       count(*) FILTER (WHERE state = 'deferred') AS deferred,
       count(*) FILTER (WHERE state = 'active') AS active
FROM recipients WHERE state IN ('queued', 'deferred', 'active')
GROUP BY domain ORDER BY count(*) DESC, domain LIMIT $1;

-- count_pending_by_tenant --
-- Queue summary: recipients still to deliver per tenant.
SELECT t.name AS tenant, count(*) AS recipients
FROM recipients AS r JOIN tenants AS t ON t.id = r.tenant_id
WHERE r.state IN ('queued', 'deferred', 'active')
GROUP BY t.name ORDER BY count(*) DESC, t.name;

-- oldest_pending --
-- Queue summary: when the oldest recipient still to deliver was queued.
SELECT min(queued_at) FROM recipients WHERE state IN ('queued', 'deferred', 'active');

-- message_by_queue_id --
-- `mtad queue show`: the message without its body.
SELECT m.id, m.queue_id, t.name AS tenant, m.mail_from, m.size_bytes, m.smtputf8, m.client_ip, m.received_at
FROM messages AS m JOIN tenants AS t ON t.id = m.tenant_id
WHERE m.queue_id = $1;

-- recipients_of_message --
-- `mtad queue show`: each recipient's state.
SELECT id, address, state, attempts, next_attempt_at, lease_owner, lease_expires_at, last_code, last_enhanced,
       last_reply, updated_at
FROM recipients WHERE message_id = $1 ORDER BY id;

-- events_of_message --
-- `mtad queue show`: what happened to the message, oldest first.
SELECT e.at, e.kind, r.address, e.code, e.enhanced, e.reply
FROM events AS e LEFT JOIN recipients AS r ON r.id = e.recipient_id
WHERE e.message_id = $1 ORDER BY e.at, e.id;

-- pause --
-- Stop delivery to a domain or for a tenant; waiting recipients are parked at the end of the due index.
WITH paused AS (
    INSERT INTO queue_pauses (domain, tenant_id) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING 1
)
UPDATE recipients SET next_attempt_at = 'infinity', updated_at = $3
WHERE state IN ('queued', 'deferred') AND (domain = $1 OR tenant_id = $2)
RETURNING id;

-- resume --
-- Lift a pause: parked recipients are due now.
WITH lifted AS (
    DELETE FROM queue_pauses WHERE domain = $1 OR tenant_id = $2 RETURNING 1
)
UPDATE recipients SET next_attempt_at = $3, updated_at = $3
WHERE state IN ('queued', 'deferred') AND next_attempt_at = 'infinity' AND (domain = $1 OR tenant_id = $2)
RETURNING id;

-- list_pauses --
-- What is paused, for the summary.
SELECT p.domain, t.name AS tenant, p.created_at
FROM queue_pauses AS p LEFT JOIN tenants AS t ON t.id = p.tenant_id ORDER BY p.created_at;

-- retry_deferred --
-- Make deferred recipients due now (all, or for one domain or tenant); paused ones stay parked.
UPDATE recipients SET next_attempt_at = $3, updated_at = $3
WHERE state = 'deferred' AND next_attempt_at > $3 AND next_attempt_at <> 'infinity'
  AND ($1::text IS NULL OR domain = $1) AND ($2::bigint IS NULL OR tenant_id = $2)
RETURNING id;

-- cancel_pending --
-- Cancel recipients not yet delivered, by domain, tenant and/or message; recipients in flight finish first.
WITH cancelled AS (
    UPDATE recipients AS r SET state = 'cancelled', updated_at = $4
    WHERE r.state IN ('queued', 'deferred')
      AND ($1::text IS NULL OR r.domain = $1) AND ($2::bigint IS NULL OR r.tenant_id = $2)
      AND ($3::text IS NULL OR r.message_id = (SELECT id FROM messages WHERE queue_id = $3))
    RETURNING r.id, r.message_id, r.tenant_id
)
INSERT INTO events (at, kind, tenant_id, message_id, recipient_id, reply)
SELECT $4, 'cancelled', tenant_id, message_id, id, 'cancelled by an operator' FROM cancelled
RETURNING recipient_id;

-- tenant_id_by_name --
-- Resolve an operator's --tenant filter.
SELECT id FROM tenants WHERE name = $1;

-- upsert_site_status --
-- A node publishes its sites' windows and states (for `queue summary`, across nodes).
INSERT INTO site_status (node, site, provider, health, concurrency, in_flight, pending, rate_scale, dead_until,
                         last_error, updated_at)
SELECT $1, s.site, s.provider, s.health, s.concurrency, s.in_flight, s.pending, s.rate_scale, s.dead_until,
       s.last_error, $2
FROM unnest($3::text[], $4::text[], $5::text[], $6::integer[], $7::integer[], $8::integer[], $9::float8[],
            $10::timestamptz[], $11::text[])
     AS s (site, provider, health, concurrency, in_flight, pending, rate_scale, dead_until, last_error)
ON CONFLICT (node, site) DO UPDATE SET
    provider = excluded.provider, health = excluded.health, concurrency = excluded.concurrency,
    in_flight = excluded.in_flight, pending = excluded.pending, rate_scale = excluded.rate_scale,
    dead_until = excluded.dead_until, last_error = excluded.last_error, updated_at = excluded.updated_at;

-- forget_site_status --
-- A node's sites it no longer holds, and nodes that stopped reporting long ago.
DELETE FROM site_status WHERE (node = $1 AND updated_at < $2) OR updated_at < $3;

-- site_statuses --
-- Sites as the live nodes see them, the most troubled first.
SELECT node, site, provider, health, concurrency, in_flight, pending, rate_scale, dead_until, last_error, updated_at
FROM site_status WHERE updated_at > $1
ORDER BY health <> 'healthy' DESC, pending + in_flight DESC, site LIMIT $2;

-- unsubscribe --
-- One transaction: the suppression, the cancelling of the address's still-queued marketing mail (of that list,
-- or of every list when $3 is ''), the events, and a NOTIFY so delivering nodes drop copies already leased.
WITH target AS (
    SELECT r.tenant_id, lower(r.address) AS address, r.message_id FROM recipients AS r
    WHERE r.id = $1 AND r.tenant_id = $2
), added AS (
    INSERT INTO suppressions (tenant_id, address, list_id, reason, source)
    SELECT tenant_id, address, $3, 'unsubscribed', $4 FROM target
    ON CONFLICT DO NOTHING
    RETURNING id
), cancelled AS (
    UPDATE recipients AS r SET state = 'cancelled', updated_at = $5
    FROM target AS t, messages AS m
    WHERE r.tenant_id = t.tenant_id AND lower(r.address) = t.address AND r.state IN ('queued', 'deferred')
      AND m.id = r.message_id AND m.class = 'marketing' AND ($3 = '' OR m.list_id = $3)
    RETURNING r.id, r.message_id, r.tenant_id
), cancelled_events AS (
    INSERT INTO events (at, kind, tenant_id, message_id, recipient_id, reply, source)
    SELECT $5, 'cancelled', tenant_id, message_id, id, 'recipient unsubscribed', $4 FROM cancelled
), notified AS (
    SELECT pg_notify('mtad_suppressed', t.tenant_id || ' unsubscribed ' || CASE WHEN $3 = '' THEN '*' ELSE $3 END
                                        || ' ' || t.address)
    FROM target AS t
), recorded AS (
    -- Only the first unsubscribe is an event: a replayed link or a repeated POST changes nothing more.
    INSERT INTO events (at, kind, tenant_id, message_id, recipient_id, reply, source)
    SELECT $5, 'unsubscribed', t.tenant_id, t.message_id, $1,
           CASE WHEN $3 = '' THEN 'from all marketing mail' ELSE 'from list ' || $3 END, $4
    FROM target AS t WHERE EXISTS (SELECT 1 FROM added)
)
SELECT (SELECT count(*) FROM cancelled) AS cancelled, (SELECT count(*) FROM notified) AS notified
FROM target;

-- recipient_for_token --
-- What an unsubscribe token points at: the recipient, its tenant, its message's class and list.
-- (The message and tenant by primary key, LATERAL and OFFSET 0 as in claim_due.)
SELECT r.id, r.tenant_id, r.address, m.class, m.list_id, t.name AS tenant
FROM recipients AS r
CROSS JOIN LATERAL (SELECT class, list_id FROM messages WHERE id = r.message_id OFFSET 0) AS m
CROSS JOIN LATERAL (SELECT name FROM tenants WHERE id = r.tenant_id OFFSET 0) AS t
WHERE r.id = $1 AND r.tenant_id = $2;

-- suppress_address --
-- A hard bounce, complaint or operator entry (tenant-wide); cancels the address's pending mail of every
-- class it applies to, and tells delivering nodes.
WITH added AS (
    INSERT INTO suppressions (tenant_id, address, list_id, reason, source, detail)
    VALUES ($1, lower($2), '', $3, $4, $5)
    ON CONFLICT DO NOTHING
    RETURNING tenant_id, address
), cancelled AS (
    UPDATE recipients AS r SET state = 'cancelled', updated_at = $6
    WHERE r.tenant_id = $1 AND lower(r.address) = lower($2) AND r.state IN ('queued', 'deferred')
    RETURNING r.id, r.message_id, r.tenant_id
), cancelled_events AS (
    INSERT INTO events (at, kind, tenant_id, message_id, recipient_id, reply, source)
    SELECT $6, 'cancelled', tenant_id, message_id, id, 'address suppressed: ' || $3, $4 FROM cancelled
)
SELECT (SELECT count(*) FROM added) AS added, (SELECT count(*) FROM cancelled) AS cancelled,
       (SELECT count(*) FROM (SELECT pg_notify('mtad_suppressed', $1 || ' ' || $3 || ' * ' || lower($2))) AS n)
           AS notified;

-- unsuppress_address --
-- An operator lifts a suppression (all reasons, or one).
DELETE FROM suppressions WHERE tenant_id = $1 AND address = lower($2) AND ($3::text IS NULL OR reason = $3)
RETURNING id;

-- list_suppressions --
-- A tenant's suppressions, for operators (and export).
SELECT address, list_id, reason, source, created_at FROM suppressions
WHERE tenant_id = $1 ORDER BY created_at, address;

-- record_feedback_event --
-- An event about a recipient from mail that came back (DSN, complaint, auto-reply).
INSERT INTO events (at, kind, tenant_id, message_id, recipient_id, code, enhanced, reply, category, source)
SELECT $1, $2, r.tenant_id, r.message_id, r.id, $3, $4, $5, $6, $7 FROM recipients AS r WHERE r.id = $8
RETURNING id;

-- events_by_recipient --
-- `mtad events --recipient`: everything that happened to one address (optionally one tenant), newest last.
SELECT e.at, e.kind, t.name AS tenant, m.queue_id, r.address, e.code, e.enhanced, e.reply, e.category, e.source,
       e.site, e.mx_host
FROM events AS e JOIN recipients AS r ON r.id = e.recipient_id JOIN messages AS m ON m.id = e.message_id
JOIN tenants AS t ON t.id = e.tenant_id
WHERE lower(r.address) = lower($1) AND ($2::text IS NULL OR t.name = $2)
ORDER BY e.at, e.id LIMIT $3;

-- events_by_message --
-- `mtad events --message`: everything that happened to one message's recipients.
SELECT e.at, e.kind, t.name AS tenant, m.queue_id, r.address, e.code, e.enhanced, e.reply, e.category, e.source,
       e.site, e.mx_host
FROM events AS e JOIN messages AS m ON m.id = e.message_id JOIN tenants AS t ON t.id = e.tenant_id
LEFT JOIN recipients AS r ON r.id = e.recipient_id
WHERE m.queue_id = $1
ORDER BY e.at, e.id LIMIT $2;

-- estimate_rows --
-- Gauge beyond the cap: PostgreSQL's estimate of a relation's rows (an index covers one state's rows).
SELECT reltuples::bigint FROM pg_class WHERE relname = $1;

-- oldest_pending_queued_at --
-- Gauge and alert: when the oldest recipient still waiting was queued (uses recipients_pending_age_idx).
SELECT min(queued_at) FROM recipients WHERE state IN ('queued', 'deferred');
