"""Prometheus metrics (prometheus-client), named mtad_<stage>_<thing>_<unit>, labels low-cardinality.

Labels are a configured provider/site name, a category from config, or a method: never a raw recipient
domain or address. The HTTP listener serves them at /metrics (the operations work).
"""

from __future__ import annotations

from prometheus_client import Counter

UNSUBSCRIBES = Counter(
    "mtad_feedback_unsubscribes_total", "Unsubscribes recorded, by how they arrived", ["method"]
)
COMPLAINTS = Counter("mtad_feedback_complaints_total", "Complaints (ARF feedback reports) recorded")
BOUNCES = Counter(
    "mtad_delivery_bounces_total", "Permanent failures, synchronous (smtp) or from DSNs (dsn), by category",
    ["source", "category"],
)
SUPPRESSED_BEFORE_ATTEMPT = Counter(
    "mtad_feedback_suppressed_before_attempt_total",
    "Leased copies dropped because their recipient left after the claim (unsubscribe, bounce) - never sent",
)
