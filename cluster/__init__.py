"""Ray: local heads, job submission, actor pools and Ray Train launch."""
