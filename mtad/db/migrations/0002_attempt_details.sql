-- Every attempt's event row says where it went and how: site, MX host, TLS version, duration.
ALTER TABLE events
    ADD COLUMN site        text,
    ADD COLUMN mx_host     text,
    ADD COLUMN tls_version text,
    ADD COLUMN duration_ms integer;
