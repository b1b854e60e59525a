"""libvirt virtual machines: domain and network XML objects, events, disks."""
