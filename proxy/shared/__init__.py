"""State shared by the replicas of a Keyless gateway, through Redis (``cache.redis``).

``config``      the ``cache`` section: Redis connection, encryption key, revocation options
``store``       one Redis client per process, its up/down state and the shared metrics
``tokens``      the shared token store behind each ``TokenCache`` (encrypted, single-flight)
``revocation``  revoked identities: pub/sub plus a polled generation counter
``admin``       the authenticated revocation endpoint on the admin listener
"""
