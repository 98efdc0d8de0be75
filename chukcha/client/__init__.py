"""The Chukcha client: :class:`Client` (asyncio), producers, consumers, a blocking wrapper."""

from chukcha.client.client import Client, parse_nodes
from chukcha.client.consumer import Batch, Consumer, ConsumerConfig, ConsumerStats, Position
from chukcha.client.ids import new_id, new_ids
from chukcha.client.producer import Producer, ProducerConfig, ProducerStats
from chukcha.client.sync import SyncClient, SyncConsumer

__all__ = [
    "Batch",
    "Client",
    "Consumer",
    "ConsumerConfig",
    "ConsumerStats",
    "Position",
    "Producer",
    "ProducerConfig",
    "ProducerStats",
    "SyncClient",
    "SyncConsumer",
    "new_id",
    "new_ids",
    "parse_nodes",
]
