"""The daemon: executes the planner's actions against backends and services."""
