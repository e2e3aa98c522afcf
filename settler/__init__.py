"""settler: settle a matching engine's trade stream into Cassandra/ScyllaDB balances."""

__version__ = "0.1.0"
