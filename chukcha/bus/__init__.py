"""The bus node: chunk storage, HTTP API, replication, membership."""
