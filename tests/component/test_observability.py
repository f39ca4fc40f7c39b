"""/metrics, /healthz and /readyz on a delivering daemon: present, and moving as mail flows."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from mtad.simulate.remote_world import RemoteWorld
from support.daemon import start_delivering, write_shaping
from support.queue import queue_messages


async def scrape(base: str) -> dict[tuple[str, tuple], float]:
    async with aiohttp.ClientSession() as http, http.get(base + "/metrics") as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_move_as_mail_is_delivered_and_health_endpoints_answer(db_url, tenants, pool, tmp_path):
    async with RemoteWorld(["mx"]) as world:
        world.add_domain("a.example", sink="mx")
        daemon = await start_delivering(db_url, tmp_path / "state", world, write_shaping(tmp_path / "shaping.toml"),
                                        status_interval="200ms")
        watcher: asyncio.Task | None = None
        try:
            base = "http://127.0.0.1:%d" % daemon.http.bound[0][1]
            async with aiohttp.ClientSession() as http:
                async with http.get(base + "/healthz") as health:
                    assert health.status == 200
                async with http.get(base + "/readyz") as ready:
                    assert ready.status == 200 and (await ready.text()) == "ready\n"
            before = await scrape(base)
            # A site's window is published while the site holds mail and dropped a round after it went quiet
            # (status_interval): watch for it while the mail flows, not only once it is all delivered.
            site_windows: set[tuple] = set()

            async def watch_site_windows() -> None:
                while True:
                    site_windows.update(labels for (name, labels) in await scrape(base)
                                        if name == "mtad_delivery_site_window_connections")
                    await asyncio.sleep(0.05)

            watcher = asyncio.create_task(watch_site_windows())
            await queue_messages(pool, [[f"r{n}@a.example"] for n in range(20)] + [["x@nowhere.example"]])
            await world.sinks["mx"].wait_for_messages(20, timeout_s=20)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                after = await scrape(base)
                # the queue gauges are refreshed every gauge_interval: a scrape right after a fast delivery can
                # still show the queue as it was before the claim (all queued, none active)
                if value(after, "mtad_delivery_attempts_total", provider="other", result="delivered") - value(
                        before, "mtad_delivery_attempts_total", provider="other", result="delivered") == 20 and not (
                        value(after, "mtad_queue_recipients", state="active")
                        or value(after, "mtad_queue_recipients", state="queued")):
                    break
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.5)  # a status round after the last delivery
        finally:
            if watcher is not None:
                watcher.cancel()
            await daemon.stop()
    delivered = "mtad_delivery_attempts_total"
    assert value(after, delivered, provider="other", result="delivered") - value(
        before, delivered, provider="other", result="delivered") == 20
    assert value(after, "mtad_queue_recipients", state="queued") == 0
    assert value(after, "mtad_queue_recipients", state="active") == 0
    assert ("mtad_queue_recipients", (("state", "delivered"),)) not in after  # finished states: event metrics
    assert value(after, "mtad_delivery_latency_seconds_count") - value(before, "mtad_delivery_latency_seconds_count") == 20
    assert value(after, "mtad_dns_lookups_total", result="nxdomain") > value(before, "mtad_dns_lookups_total", result="nxdomain")
    assert value(after, "mtad_delivery_connections_opened_total", provider="other", tls="none") > 0
    assert value(after, "mtad_db_up") == 1 and value(after, "mtad_ready") == 1
    assert value(after, "mtad_db_pool_connections", state="idle") + value(after, "mtad_db_pool_connections", state="in_use") > 0
    assert site_windows and all(dict(labels)["site"] in ("other", "google", "microsoft", "yahoo")
                                for labels in site_windows)
    # no raw recipient domain or address is a label value anywhere
    assert not [key for key in after if any("a.example" in str(v) or "@" in str(v) for _, v in key[1])]
