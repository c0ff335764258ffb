"""Dataset readers and the webdataset shard writer (`vdvae prep`)."""
