"""The built-in methods; importing this package registers them."""
