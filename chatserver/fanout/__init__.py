"""Fan-out: frames encoded once, the local hub, sessions and their send queues, the brokers
between instances."""
