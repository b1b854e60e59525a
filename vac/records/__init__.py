"""State on disk (atomic writes, versioned format, recovery) and APEL accounting records."""
