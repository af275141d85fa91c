"""kdcache pipeline: corpus -> teacher actors -> shards; students from shards; recipes; CLI."""
