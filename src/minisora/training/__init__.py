"""LightningModules and training glue: they wire a network to its objective, optimizer and logging."""
