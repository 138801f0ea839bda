"""The one image loop (decode workers, pinned upload, torchrun sharding) and the one text loop."""
