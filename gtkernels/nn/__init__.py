"""Model layers built on the gtkernels ops."""
