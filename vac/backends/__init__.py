"""Machine backends: one kind of machine each, behind one interface. Import only vac.core."""
