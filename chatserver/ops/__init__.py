"""Operations: metrics, observers, structured logs, drain on shutdown, partition maintenance."""
