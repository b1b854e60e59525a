"""What machines and peers talk to: metadata and MJF over HTTP, VacQuery. Import core and
records, never the daemon or a command-line face."""
