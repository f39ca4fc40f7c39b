"""Queue-id randomness fetched in bulk: still 32 fresh bits each time, and never shared with a forked child."""

from __future__ import annotations

import multiprocessing

from mtad.ingest.random_bits import RandomBits


def test_numbers_span_32_bits_and_do_not_repeat_across_refills():
    bits = RandomBits()
    values = [bits.next32() for _ in range(5000)]  # several 4 KiB refills
    assert all(0 <= v < 2**32 for v in values)
    assert len(set(values)) > 4990
    assert max(values) > 2**31  # the top bit is used


def _draw(bits: RandomBits, results) -> None:
    results.put([bits.next32() for _ in range(16)])


def test_a_forked_child_does_not_repeat_its_parents_numbers():
    bits = RandomBits()
    bits.next32()  # the parent holds a buffer of unread bytes
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_draw, args=(bits, results))
    child.start()
    drawn_by_child = results.get(timeout=30)
    child.join(timeout=30)
    assert drawn_by_child != [bits.next32() for _ in range(16)]
