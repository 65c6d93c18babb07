"""Teacher logit cache: fingerprinted, resumable Parquet shards of sparse teacher targets.

stage.py    the per-shard routine (CacheWorker) and the driver (run_cache, cache_dir_for)
codec.py    plain and compact layouts of the targets
writer.py   temp name + fsync + rename + footer flags
manifest.py plan.json (first) and manifest.json (last)
verify.py   shard checks shared by re-runs and `posdistill cache verify`
info.py     `posdistill cache info`
reader.py   ShardReader, the training side's streaming input, and check_cache
synthetic.py LLM-like distributions over a 128k vocabulary for the codec benchmark
"""
