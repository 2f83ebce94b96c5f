"""One run of a job: scheduling, throttling, health, progress and verification."""
