"""What samples the groups: the in-process policy (policy.py, its batched decode in decoding.py), an inference
engine reached over the OpenAI API (engines.py), and Ray workers that fan collection out (workers.py)."""
