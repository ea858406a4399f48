"""Datasets as versioned Parquet shards on object storage: source adapters, writer, readers, transforms."""
