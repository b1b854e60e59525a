"""Operations: sd_notify, metrics, logging, daemonizing, host facts."""
