"""Prometheus metrics (prometheus-client), named mtad_<stage>_<thing>_<unit>; counters end in _total.

Labels stay bounded: a configured provider name or "other" (never a raw recipient domain or address), a
tenant (a configured customer), a category or method from config. Queue gauges are refreshed by a
background task with capped queries (mtad.observe.queue_gauges), never by a scan per scrape.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# -- ingest -------------------------------------------------------------------------------------------
SUBMISSIONS = Counter(
    "mtad_ingest_submissions_total", "Messages submitted, by tenant and result (accepted, refused, failed)",
    ["tenant", "result"],
)
AUTH_FAILURES = Counter("mtad_ingest_auth_failures_total", "Failed SMTP AUTH attempts (throttled ones included)")

# -- delivery -----------------------------------------------------------------------------------------
ATTEMPTS = Counter(
    "mtad_delivery_attempts_total",
    "Recipient delivery attempts by provider and result (delivered, deferred, bounced, expired)",
    ["provider", "result"],
)
BOUNCES = Counter(
    "mtad_delivery_bounces_total", "Permanent failures, synchronous (smtp) or from DSNs (dsn), by category",
    ["source", "category"],
)
SESSION_FAILURES = Counter(
    "mtad_delivery_session_failures_total", "Outbound sessions that failed (connect, greeting, TLS) or were throttled",
    ["provider", "kind"],
)
CONNECTIONS_OPENED = Counter(
    "mtad_delivery_connections_opened_total", "Outbound SMTP connections opened, by provider and TLS version",
    ["provider", "tls"],
)
DELIVERY_LATENCY = Histogram(
    "mtad_delivery_latency_seconds", "Time from submission to delivery, per delivered recipient",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
)
DKIM_SIGN = Histogram(
    "mtad_dkim_sign_seconds", "Time to DKIM-sign one copy", buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01)
)
DNS_LOOKUPS = Counter("mtad_dns_lookups_total", "DNS lookups for routing, by result", ["result"])
SITE_WINDOW = Gauge("mtad_delivery_site_window_connections", "Concurrency window of a site", ["provider", "site"])
SITE_IN_FLIGHT = Gauge("mtad_delivery_site_in_flight_connections", "Deliveries in flight to a site", ["provider", "site"])
SITE_PENDING = Gauge("mtad_delivery_site_pending_recipients", "Recipients held for a site", ["provider", "site"])
SITE_BACKOFF = Gauge(
    "mtad_delivery_site_backoff_state",
    "Sites in each state (healthy, backoff, dead): 0 or 1 for a provider, a count for 'other'",
    ["provider", "site", "state"],
)
POSTPONED = Counter(
    "mtad_delivery_postponed_total",
    "Recipients their site could not send within a quarter lease, put back in the queue until their turn",
)
CONNECTIONS_OPEN = Gauge("mtad_delivery_connections_open", "Outbound SMTP connections open, by provider", ["provider"])

# -- queue --------------------------------------------------------------------------------------------
QUEUE_RECIPIENTS = Gauge(
    "mtad_queue_recipients",
    "Recipients still in the queue by state: queued, deferred, active (exact up to a cap, then an estimate)",
    ["state"],
)
QUEUE_OLDEST_AGE = Gauge("mtad_queue_oldest_pending_age_seconds", "Age of the oldest recipient still to deliver")

# -- feedback -----------------------------------------------------------------------------------------
UNSUBSCRIBES = Counter("mtad_feedback_unsubscribes_total", "Unsubscribes recorded, by how they arrived", ["method"])
COMPLAINTS = Counter("mtad_feedback_complaints_total", "Complaints (ARF feedback reports) recorded")
SUPPRESSED_BEFORE_ATTEMPT = Counter(
    "mtad_feedback_suppressed_before_attempt_total",
    "Leased copies dropped because their recipient left after the claim (unsubscribe, bounce): never sent",
)

# -- cluster ------------------------------------------------------------------------------------------
# Every node exports its own series (Prometheus tells them apart by `instance`); cluster totals are sums
# over instances, except the queue gauges above, which every node reads from the shared database (max()).
CLUSTER_NODES = Gauge("mtad_cluster_nodes_live", "Nodes with a recent heartbeat, this one included")
CLUSTER_SLOTS_HELD = Gauge(
    "mtad_cluster_connection_slots_held", "Cluster-wide connection slots this node holds (one per open connection)"
)
CLUSTER_SLOT_WAITS = Counter(
    "mtad_cluster_slot_waits_total", "Deliveries that waited because every connection slot of the site was held",
    ["provider"],
)
NODE_INFO = Gauge("mtad_node_info", "This node's name (host:pid:random) and worker number; always 1", ["node", "worker"])

# -- process ------------------------------------------------------------------------------------------
EVENT_LOOP_LAG = Gauge("mtad_process_event_loop_lag_seconds", "How late a 0.5 s timer fired on the event loop")
DB_POOL = Gauge("mtad_db_pool_connections", "PostgreSQL pool connections by state (in_use, idle)", ["state"])
DB_UP = Gauge("mtad_db_up", "1 when PostgreSQL answered the last health query")
READY = Gauge("mtad_ready", "1 when the daemon's listeners are up and its database reachable")
