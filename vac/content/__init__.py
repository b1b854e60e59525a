"""What a machine is made from: user_data templates, the image cache, X.509 proxies and
signatures, vacuum pipes. Import core and records."""
