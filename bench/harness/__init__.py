"""The sweep harness: sweep expansion, planning and skips, the supervised worker, the Ray executor,
measurement of one configuration, and merging shards."""
