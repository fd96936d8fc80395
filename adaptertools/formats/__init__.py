"""Built-in adapter formats; each module exposes sniff / read / write (see registry.py)."""

