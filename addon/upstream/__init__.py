"""hubcache's own requests upstream: building and sending them, a fill's bytes off the event
loop, and the circuit breakers."""
