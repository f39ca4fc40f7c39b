import pytest

from support.daemon import add_test_tenants, start_in_process


@pytest.fixture
async def tenants(pool):
    await add_test_tenants(pool)


@pytest.fixture
async def daemon(db_url, tenants, tmp_path):
    running = await start_in_process(db_url, tmp_path, max_failed_logins=3, max_recipients=5, max_message_size="64KB")
    yield running
    await running.stop()
