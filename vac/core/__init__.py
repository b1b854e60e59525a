"""The pure core: configuration schema, machine records and the planner. Imports only the
standard library; never touches libvirt, sockets, files or the clock."""
