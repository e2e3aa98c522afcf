"""The local stack without Docker: Apache Kafka (KRaft) and Apache Cassandra started from
Maven Central jars on loopback (`settler dev up | status | down`), and its secure mode."""
