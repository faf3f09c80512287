"""distillery: distil large text models into small multi-task e-commerce students on Ray."""

__version__ = "0.1.0"
