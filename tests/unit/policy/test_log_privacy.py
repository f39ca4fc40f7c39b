from mtad.policy.log_privacy import LogPrivacy


def test_client_ips_are_masked_unless_the_operator_opts_out():
    assert LogPrivacy().client_ip("192.0.2.77") == "192.0.2.0"
    assert LogPrivacy(mask_client_ips=False).client_ip("192.0.2.77") == "192.0.2.77"


def test_recipients_are_shown_unless_pseudonymised():
    assert LogPrivacy().recipient(1, "Alice@x.example") == "Alice@x.example"


def test_pseudonyms_are_stable_per_tenant_and_differ_between_tenants():
    privacy = LogPrivacy(pseudonymise_recipients=True, key=b"k" * 32)
    first = privacy.recipient(1, "alice@x.example")
    assert first.startswith("r:") and len(first) == 18 and "alice" not in first
    assert privacy.recipient(1, "ALICE@x.example") == first
    assert privacy.recipient(2, "alice@x.example") != first
    assert LogPrivacy(pseudonymise_recipients=True, key=b"j" * 32).recipient(1, "alice@x.example") != first
