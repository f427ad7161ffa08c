"""Adapter versions: the filesystem store (PEFT folders), the Redis registry, per-replica hot-loading."""
