"""Framework glue: the only modules that import lightning or accelerate."""
