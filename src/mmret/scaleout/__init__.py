"""Scale-out above the engine: encoding on a Ray cluster into shards, then adding the shards."""
