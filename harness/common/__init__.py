"""Small helpers every concern shares, one per job: device and system facts, text escaping, files, numbers."""
