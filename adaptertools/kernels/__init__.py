"""Numeric building blocks: pure-torch references first, faster paths checked against them."""
